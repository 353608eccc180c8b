"""Stateful detection of query-based attacks: near-duplicate inputs per account.

An inversion attack through an API probes thousands of inputs that differ from each
other by less than any honest user's photos do (finite differences, NES samples, a
Jacobian's basis steps, a label-only attack's neighbours). Following Blacklight
(Li et al., "Blacklight: Scalable Defense for Neural Networks against Query-Based
Black-Box Attacks", USENIX Security 2022), each input is quantised (``step``), cut
into sliding windows of ``window`` consecutive values, every window hashed, and the
``hashes`` smallest distinct hashes kept as its fingerprint. An input is a near
duplicate of an earlier one when their fingerprints share ``match`` (a half) of the
fingerprint size an input of that shape can have, so a flat image with few distinct
windows matches nothing. The
guard keeps the fingerprints of each account's last ``history`` inputs and counts the
inputs that are near duplicates of an earlier one. Once an account has sent ``after``
of them it is **flagged for investigation** (a :class:`Flag` goes to the flag store,
the SQLite account database in the service) and, with ``action="block"``, refused
with Blocked (HTTP 403) from then on until an operator clears the flag.

It is meant for images: the service gives survey (tabular) models none. What it cannot
see (measured in BENCHMARKS.md, "Query detector"): an attacker spreading the probes over
many accounts, blinding each probe with noise of about ``step`` / 4 or more, or sending
``history`` other inputs between two probes.
"""

from __future__ import annotations

import functools
import math
import threading
from dataclasses import dataclass, field
from typing import Literal, Protocol

import numpy as np

from mlinvert.errors import Blocked, ConfigError

DETECTOR_GRAMMAR = (
    "detect[:ACTION][:AFTER] with ACTION flag (flag for investigation, keep answering) or "
    "block (flag, then refuse with 403) and AFTER the near-duplicate inputs an account may "
    "send before it is flagged; e.g. detect, detect:block, detect:flag:500"
)

#: The polynomial hash's base (odd, so invertible modulo 2**64).
_BASE = 0x9E3779B97F4A7C15


@functools.lru_cache(maxsize=8)
def _powers(length: int) -> tuple[np.ndarray, np.ndarray]:
    """``BASE**t`` and ``BASE**-t`` modulo 2**64 for t < ``length``."""
    inverse = _BASE
    for _ in range(6):  # Newton's iteration doubles the correct low bits: 3 -> 192
        inverse = inverse * (2 - _BASE * inverse) % 2**64
    up = np.empty(length, dtype=np.uint64)
    down = np.empty(length, dtype=np.uint64)
    a = b = 1
    for t in range(length):
        up[t], down[t] = a, b
        a, b = a * _BASE % 2**64, b * inverse % 2**64
    return up, down


@dataclass(frozen=True, kw_only=True)
class DetectorConfig:
    """How inputs are fingerprinted and when an account is flagged.

    ``step`` is the quantisation step on the [0, 1] scale (Blacklight's 50 of 255 is
    about 0.2); ``window`` the number of consecutive values per hashed window;
    ``hashes`` the fingerprint size; ``match`` the share of a fingerprint two inputs
    must have in common to be near duplicates; ``after`` how many near-duplicate inputs
    flag an account; ``history`` how many of an account's latest inputs are remembered
    (16 bytes per hash: 8 MB per account at 10 000 inputs of 50 hashes); ``per_hash``
    how many of the latest inputs sharing one hash value are compared (bounds the work
    per query when an attack repeats the same windows thousands of times; measured on
    the audit's black-box attack, 32 misses a fifth of the near duplicates, 1024 none).
    """

    action: Literal["flag", "block"] = "flag"
    after: int = 100
    step: float = 0.2
    window: int = 20
    hashes: int = 50
    match: float = 0.5
    history: int = 10_000
    per_hash: int = 1024

    def __post_init__(self) -> None:
        if self.action not in ("flag", "block"):
            raise ConfigError(f"detector action must be flag or block, got {self.action!r}")
        checks = (
            ("after", self.after >= 1, ">= 1"),
            ("step", math.isfinite(self.step) and 1 / 255 <= self.step <= 1.0, "in [1/255, 1]"),
            ("window", self.window >= 1, ">= 1"),
            ("hashes", self.hashes >= 1, ">= 1"),
            ("match", math.isfinite(self.match) and 0.0 < self.match <= 1.0, "in (0, 1]"),
            ("history", self.history >= 1, ">= 1"),
            ("per_hash", self.per_hash >= 1, ">= 1"),
        )
        for name, ok, rule in checks:
            if not ok:
                raise ConfigError(f"detector {name} must be {rule}, got {getattr(self, name)!r}")

    @property
    def name(self) -> str:
        """The spec that rebuilds this configuration's action and threshold."""
        return f"detect:{self.action}:{self.after}"


def parse_detector(spec: str) -> DetectorConfig:
    """Parse ``detect``, ``detect:block``, ``detect:flag:500`` into a DetectorConfig."""
    parts = [p.strip() for p in spec.strip().lower().split(":")]
    if parts[0] != "detect" or len(parts) > 3:
        raise ConfigError(f"detector spec {spec!r} not understood; grammar: {DETECTOR_GRAMMAR}")
    values: dict[str, object] = {}
    for part in parts[1:]:
        if part in ("flag", "block") and "action" not in values and "after" not in values:
            values["action"] = part
        elif part.isascii() and part.isdigit() and "after" not in values:
            values["after"] = int(part)
        else:
            raise ConfigError(
                f"detector spec {spec!r}: {part!r} is neither an action nor a count; "
                f"grammar: {DETECTOR_GRAMMAR}"
            )
    return DetectorConfig(**values)  # type: ignore[arg-type]


#: Latest inputs per hash compared first (then up to ``per_hash``).
_FIRST_LOOK = 32
#: Inputs an account's latest hashes wait in a dict before one merge into its store.
_MERGE_EVERY = 256


def _n_windows(x: np.ndarray, config: DetectorConfig) -> int:
    """How many windows one input of ``x``'s shape has."""
    d = int(np.prod(x.shape[1:]))
    return d - min(config.window, d) + 1


def _mix(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser, in place: spreads polynomial window hashes over 64 bits."""
    with np.errstate(over="ignore"):
        z ^= z >> np.uint64(30)
        z *= np.uint64(0xBF58476D1CE4E5B9)
        z ^= z >> np.uint64(27)
        z *= np.uint64(0x94D049BB133111EB)
        z ^= z >> np.uint64(31)
    return z


def fingerprints(x: np.ndarray, config: DetectorConfig) -> list[np.ndarray]:
    """One fingerprint per input: its ``hashes`` smallest distinct window hashes (uint64).

    Inputs are flattened in C order, so on images the windows run along pixel rows.
    """
    flat = np.asarray(x, dtype=np.float32).reshape(len(x), -1)
    levels = np.floor(np.clip(flat, 0.0, 1.0) / np.float32(config.step)).astype(np.uint8)
    d = flat.shape[1]
    width = min(config.window, d)
    up, down = _powers(d + 1)
    # window i's hash is sum_j level[i + j] * BASE**j (mod 2**64), read off the prefix
    # sums of level[t] * BASE**t in O(d) per input
    prefix = np.zeros((len(flat), d + 1), dtype=np.uint64)
    with np.errstate(over="ignore"):
        np.cumsum(levels * up[:d], axis=1, out=prefix[:, 1:])
        hashed = (prefix[:, width:] - prefix[:, : d - width + 1]) * down[: d - width + 1]
        hashed = np.sort(_mix(hashed), axis=1)
    # keep each row's first ``hashes`` distinct values: a background window repeated
    # thousands of times counts once
    first = np.empty(hashed.shape, dtype=bool)
    first[:, 0] = True
    np.not_equal(hashed[:, 1:], hashed[:, :-1], out=first[:, 1:])
    first &= np.cumsum(first, axis=1) <= config.hashes
    return [row[keep] for row, keep in zip(hashed, first, strict=True)]


@dataclass(frozen=True)
class Flag:
    """An account flagged for investigation: when, and the evidence at that moment."""

    account: str
    at: float
    near_duplicates: int
    inputs: int
    detail: str


class FlagStore(Protocol):
    """Where flags live; the service keeps them in its SQLite account database."""

    def flag(self, flag: Flag) -> None:
        """Record ``flag`` (a flagged account stays flagged until cleared)."""
        ...

    def flagged(self, account: str) -> Flag | None:
        """The account's standing flag, or None."""
        ...


class MemoryFlags:
    """Flags in a dict (one process); :class:`~mlinvert.service.store.Store` persists them."""

    def __init__(self) -> None:
        self._flags: dict[str, Flag] = {}
        self._lock = threading.Lock()

    def flag(self, flag: Flag) -> None:
        """Record a flag."""
        with self._lock:
            self._flags.setdefault(flag.account, flag)

    def flagged(self, account: str) -> Flag | None:
        """The account's flag, or None."""
        with self._lock:
            return self._flags.get(account)

    def unflag(self, account: str) -> None:
        """Clear an account's flag."""
        with self._lock:
            self._flags.pop(account, None)


@dataclass
class _History:
    """One account's remembered window hashes.

    ``keys`` sorted, ``ids`` the input each came from (equal keys in the order they
    arrived), 16 bytes per hash; the latest inputs wait in ``recent`` (hash -> inputs)
    and are merged in every ``_MERGE_EVERY`` inputs, so a one-input request does not
    copy the whole store.
    """

    keys: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.uint64))
    ids: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    recent: dict[int, list[int]] = field(default_factory=dict)
    pending: list[np.ndarray] = field(default_factory=list)  # fingerprints in ``recent``
    inputs: int = 0
    near: int = 0
    forgotten_below: int = 0  # ids below this were compacted away


class QueryDetector:
    """Guard: flags (and with ``action="block"`` refuses) accounts sending near duplicates.

    Blacklight, Li et al., USENIX Security 2022; see the module docstring. Every input
    of a batch the earlier guards admitted is fingerprinted in ``check``, in order, so
    the probes of one batch are compared with each other too. Fingerprints are kept in
    memory per process (with several service processes each sees its share of an
    account's inputs); flags go to ``flags`` (memory by default, SQLite in the service,
    so every process and a restart see them).
    """

    name = "detector"

    def __init__(self, config: DetectorConfig | str = "detect", flags: FlagStore | None = None):
        self.config = parse_detector(config) if isinstance(config, str) else config
        self.flags: FlagStore = flags if flags is not None else MemoryFlags()
        self._accounts: dict[str, _History] = {}
        self._lock = threading.Lock()

    def check(self, account: str, x: np.ndarray, now: float) -> None:
        """Fingerprint the batch, count near duplicates, flag; refuse a blocked account."""
        cfg = self.config
        if cfg.action == "block":
            self._refuse_if_flagged(account)
        prints = fingerprints(x, cfg)
        with self._lock:
            state = self._accounts.setdefault(account, _History())
            need = math.ceil(cfg.match * min(cfg.hashes, _n_windows(x, cfg)))
            for fp in prints:
                qid = state.inputs
                state.inputs += 1
                if self._is_near_duplicate(state, fp, qid, need):
                    state.near += 1
                for h in fp.tolist():
                    state.recent.setdefault(h, []).append(qid)
                state.pending.append(fp)
            if len(state.pending) >= _MERGE_EVERY:
                self._merge(state)
            crossed = state.near >= cfg.after
            if crossed:
                near, inputs = state.near, state.inputs
                state.near = 0  # a cleared account starts counting afresh
        if crossed and self.flags.flagged(account) is None:
            self.flags.flag(
                Flag(
                    account=account,
                    at=now,
                    near_duplicates=near,
                    inputs=inputs,
                    detail=(
                        f"{near} of the {inputs} inputs this account sent were near duplicates of "
                        f"earlier ones ({cfg.name}, {cfg.match:.0%} of "
                        f"{cfg.hashes} window hashes shared)"
                    ),
                )
            )
        if cfg.action == "block":
            self._refuse_if_flagged(account)

    def observe(self, account: str, x: np.ndarray, now: float) -> None:
        """Nothing to do: every admitted input was fingerprinted in ``check``."""

    def status(self, account: str) -> dict[str, int]:
        """Inputs remembered and near duplicates counted since the account's last flag."""
        with self._lock:
            state = self._accounts.get(account)
            return (
                {"inputs": 0, "near_duplicates": 0}
                if state is None
                else {
                    "inputs": state.inputs,
                    "near_duplicates": state.near,
                }
            )

    def _refuse_if_flagged(self, account: str) -> None:
        flag = self.flags.flagged(account)
        if flag is not None:
            raise Blocked(
                f"account {account!r} is blocked: flagged for investigation by the query "
                f"detector ({flag.detail}); an operator clears it with "
                f"`mlinvert keys unflag {account}`"
            )

    def _is_near_duplicate(self, state: _History, fp: np.ndarray, qid: int, need: int) -> bool:
        """Does ``fp`` share ``need`` hashes with one remembered input?

        ``need`` is ``match`` of the fingerprint size an input of this shape can have,
        so a flat, low-texture input (few distinct windows) is not a near duplicate of
        everything. Per hash only its ``per_hash`` latest inputs are looked at (an
        attack repeats a background window thousands of times); inputs older than
        ``history`` are ignored.
        """
        cfg = self.config
        within = state.recent
        lo = np.searchsorted(state.keys, fp, side="left")
        hi = np.searchsorted(state.keys, fp, side="right")
        hashes = fp.tolist()
        present = hi > lo
        if int(present.sum()) + sum(1 for h in hashes if h in within) < need:
            return False
        # most near duplicates repeat one of the latest inputs: look at those first
        for depth in sorted({min(_FIRST_LOOK, cfg.per_hash), cfg.per_hash}):
            start = np.maximum(lo, hi - depth)
            parts = [state.ids[a:b] for a, b in zip(start.tolist(), hi.tolist(), strict=True)]
            waiting = [i for h in hashes if h in within for i in within[h][-depth:]]
            ids = np.concatenate([*parts, np.asarray(waiting, dtype=np.int64)])
            ids = ids[ids >= qid - cfg.history]
            if ids.size >= need and int(np.bincount(ids - ids.min()).max()) >= need:
                return True
            cut = bool((start > lo).any()) or any(len(within.get(h, ())) > depth for h in hashes)
            if not cut:
                return False
        return False

    def _merge(self, state: _History) -> None:
        """Merge the waiting hashes into the sorted store; compact away forgotten inputs."""
        cfg = self.config
        prints, state.pending, state.recent = state.pending, [], {}
        first = state.inputs - len(prints)
        keys = np.concatenate(prints)
        ids = np.repeat(np.arange(first, state.inputs, dtype=np.int64), [len(f) for f in prints])
        order = np.argsort(keys, kind="stable")
        at = np.searchsorted(state.keys, keys[order], side="right")
        state.keys = np.insert(state.keys, at, keys[order])
        state.ids = np.insert(state.ids, at, ids[order])
        oldest = state.inputs - cfg.history
        if oldest - state.forgotten_below >= max(cfg.history // 10, 1):
            keep = state.ids >= oldest
            state.keys, state.ids = state.keys[keep], state.ids[keep]
            state.forgotten_below = oldest
