"""Oracle wrappers that keep the Oracle interface and stack (Foolbox habit).

``Budgeted`` refuses a batch that would exceed an attacker-side budget, ``Recording``
keeps every query and answer, ``Cached`` answers repeated inputs without asking the
wrapped oracle again, ``Blinded`` adds fresh noise to every probe (the adaptive attacker
against a query detector), ``Rotating`` moves to a fresh account when one is refused
(the Sybil attacker against per-account guards). Counting stays in the base oracle:
``n_queries`` of a wrapper is the wrapped oracle's count (``Rotating``'s the sum over its
accounts), so a stack reports the queries that really reached the API.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mlinvert.core import OracleInfo, Response, Seed, rng_from
from mlinvert.errors import Blocked, BudgetExhausted, ConfigError, GradientUnavailable, RateLimited
from mlinvert.oracle.base import Oracle


class _Wrapper:
    """Delegate ``info``, ``n_queries`` and ``class_gradient`` to the wrapped oracle."""

    def __init__(self, oracle: Oracle) -> None:
        self.inner = oracle

    @property
    def info(self) -> OracleInfo:
        """The wrapped oracle's info."""
        return self.inner.info

    @property
    def n_queries(self) -> int:
        """Inputs the base oracle answered (wrappers never count themselves)."""
        return self.inner.n_queries

    def class_gradient(self, x: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """Pass a white-box gradient request through (GradientUnavailable if absent)."""
        grad = getattr(self.inner, "class_gradient", None)
        if grad is None:
            raise GradientUnavailable(
                f"oracle {type(self.inner).__name__} answers predictions only; a white-box "
                "gradient needs a WhiteBoxOracle over a local differentiable model, or use a "
                "black-box gradient source (FiniteDifferences, NES, SPSA)"
            )
        return np.asarray(grad(x, labels))

    def query(self, x: np.ndarray) -> Response:
        """Answer a batch through the wrapped oracle."""
        return self.inner.query(x)


def has_gradient(oracle: Oracle) -> bool:
    """True when ``oracle`` (through any wrappers) can answer ``class_gradient``."""
    while isinstance(oracle, _Wrapper):
        oracle = oracle.inner
    return callable(getattr(oracle, "class_gradient", None))


class Budgeted(_Wrapper):
    """Refuse (BudgetExhausted) any batch that would take the count past ``budget``.

    The refused batch is not sent at all, so no answer is paid for and lost. ``spent``
    counts from the wrapper's creation; ``already_spent`` accounts for queries paid
    before (a resumed attack passes its earlier count).
    """

    def __init__(self, oracle: Oracle, budget: int, *, already_spent: int = 0) -> None:
        if budget < 1:
            raise ConfigError(f"query budget must be >= 1, got {budget}")
        super().__init__(oracle)
        self.budget = int(budget)
        self._start = oracle.n_queries - int(already_spent)

    @property
    def spent(self) -> int:
        """Queries counted against the budget so far."""
        return self.inner.n_queries - self._start

    @property
    def remaining(self) -> int:
        """Queries still allowed."""
        return max(self.budget - self.spent, 0)

    def _charge(self, n: int) -> None:
        if n > self.remaining:
            raise BudgetExhausted(
                f"query budget of {self.budget} reached ({self.spent} spent, a batch of {n} "
                "refused); raise --budget or resume from the checkpoint with a larger budget"
            )

    def query(self, x: np.ndarray) -> Response:
        """Answer ``x`` if the whole batch fits in the remaining budget."""
        self._charge(int(np.shape(x)[0]))
        return self.inner.query(x)

    def class_gradient(self, x: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """A white-box gradient costs one query per input, like the base oracle counts it."""
        self._charge(int(np.shape(x)[0]))
        return super().class_gradient(x, labels)


class Recording(_Wrapper):
    """Keep every input sent and every answer received (in order)."""

    def __init__(self, oracle: Oracle) -> None:
        super().__init__(oracle)
        self.inputs: list[np.ndarray] = []
        self.responses: list[Response] = []

    def query(self, x: np.ndarray) -> Response:
        """Forward ``x`` and record the batch and its answer."""
        response = self.inner.query(x)
        self.inputs.append(np.array(x, dtype=np.float32, copy=True))
        self.responses.append(response)
        return response

    def all_inputs(self) -> np.ndarray:
        """Every input row sent so far, stacked ``(n, *shape)``."""
        if not self.inputs:
            return np.zeros((0, *self.info.input_shape), dtype=np.float32)
        return np.concatenate(self.inputs)

    def fingerprints(self) -> list[str]:
        """One content hash per input row (to compare two runs' queries)."""
        return [row_key(row) for row in self.all_inputs()]


def row_key(row: np.ndarray) -> str:
    """Hash of one float32 input row (exact content)."""
    return hashlib.blake2b(
        np.ascontiguousarray(row, dtype=np.float32).tobytes(), digest_size=16
    ).hexdigest()


class Cached(_Wrapper):
    """Answer inputs seen before from memory; only new rows reach the wrapped oracle.

    Rows are matched by exact float32 content. ``hits`` counts rows answered from the
    cache. Answers are deterministic only if the oracle's are (a noisy policy's first
    answer is reused).
    """

    def __init__(self, oracle: Oracle, *, max_entries: int = 1_000_000) -> None:
        super().__init__(oracle)
        self.max_entries = max_entries
        self.hits = 0
        self._store: dict[str, tuple[int, Any, Any]] = {}

    def query(self, x: np.ndarray) -> Response:
        """Answer ``x``, asking the wrapped oracle only for unseen rows (one batch)."""
        x = np.asarray(x, dtype=np.float32)
        keys = [row_key(row) for row in x]
        missing: list[int] = []
        seen: dict[str, int] = {}
        for i, key in enumerate(keys):
            if key not in self._store and key not in seen:
                seen[key] = i
                missing.append(i)
        fresh: dict[str, tuple[int, Any, Any]] = {}
        if missing:
            answer = self.inner.query(x[missing])
            for j, i in enumerate(missing):
                fresh[keys[i]] = (
                    int(answer.labels[j]),
                    None if answer.probs is None else answer.probs[j].copy(),
                    None if answer.confidence is None else float(answer.confidence[j]),
                )
        self.hits += len(keys) - len(missing)
        rows = [fresh[k] if k in fresh else self._store[k] for k in keys]
        for key, row in fresh.items():
            if len(self._store) >= self.max_entries:
                self._store.pop(next(iter(self._store)))
            self._store[key] = row
        labels = np.asarray([r[0] for r in rows], dtype=np.int64)
        probs = None if rows[0][1] is None else np.stack([r[1] for r in rows])
        confidence = (
            None if rows[0][2] is None else np.asarray([r[2] for r in rows], dtype=np.float64)
        )
        return Response(labels=labels, probs=probs, confidence=confidence)


class Journaled(_Wrapper):
    """Keep every answered batch in a journal file and, when the file already holds
    answers (a run that was interrupted: a lost worker, a killed process), answer the
    same batches again from it instead of asking the API a second time.

    A deterministic attack re-run from its start sends the same batches in the same
    order, so the journal's batches are replayed one by one, each checked by its
    SHA-256; the first batch that differs (or the end of the journal) goes to the API,
    and from there on every answer is appended (flushed per batch). Replayed inputs
    count in ``n_queries`` as the answers they stand for: the attack's counts are those
    of an uninterrupted run, and the API is not asked twice for what it answered.
    """

    def __init__(self, oracle: Oracle, path: Path) -> None:
        super().__init__(oracle)
        self.path = Path(path)
        self.replayed = 0
        self._journal = self._read()
        self._next = 0  # the journal entry the next batch is checked against
        self._live = not self._journal

    def _read(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        entries = []
        for line in self.path.read_text().splitlines():
            try:
                entries.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut short by the interruption
                break
        return entries

    @property
    def n_queries(self) -> int:
        """Inputs answered: by the API in this run, plus those replayed from the journal."""
        return self.inner.n_queries + self.replayed

    def query(self, x: np.ndarray) -> Response:
        """Answer ``x`` from the journal while it matches, else from the API (and keep it)."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        digest = hashlib.sha256(x.tobytes() + repr(x.shape).encode()).hexdigest()
        if not self._live:
            if self._next < len(self._journal) and self._journal[self._next]["digest"] == digest:
                self._next += 1
                self.replayed += len(x)
                return _response_of(self._journal[self._next - 1])
            # the run departs from the journal here: keep what was replayed, then go live
            kept = self._journal[: self._next]
            self.path.write_text("".join(json.dumps(e) + "\n" for e in kept))
            self._live, self._journal = True, []
        answer = self.inner.query(x)
        with self.path.open("a") as f:
            f.write(json.dumps({"digest": digest, **_entry_of(answer)}) + "\n")
        return answer


def _entry_of(r: Response) -> dict[str, Any]:
    return {
        "labels": np.asarray(r.labels).tolist(),
        "probs": None if r.probs is None else np.asarray(r.probs, dtype=np.float64).tolist(),
        "confidence": None if r.confidence is None else np.asarray(r.confidence).tolist(),
        "label_names": None if r.label_names is None else list(r.label_names),
    }


def _response_of(entry: dict[str, Any]) -> Response:
    return Response(
        labels=np.asarray(entry["labels"], dtype=np.int64),
        probs=None if entry["probs"] is None else np.asarray(entry["probs"], dtype=np.float64),
        confidence=(
            None
            if entry["confidence"] is None
            else np.asarray(entry["confidence"], dtype=np.float64)
        ),
        label_names=None if entry["label_names"] is None else tuple(entry["label_names"]),
    )


class Blinded(_Wrapper):
    """Query blinding: every probe gets fresh uniform noise in ``[-amplitude, amplitude]``
    per value (clipped to [0, 1]) before it reaches the wrapped oracle.

    The adaptive attacker against a stateful query detector (Li et al., "Blacklight",
    USENIX Security 2022, Section 7; :class:`mlinvert.defenses.QueryDetector`): noise
    coarser than the detector's quantisation leaves no two probes with the same windows.
    The attack then climbs noisy scores; BENCHMARKS.md ("Query detector") measures what
    it still recovers.

    ``caught`` (optional) counts the times the attacker learnt its probes were caught
    (see :func:`escalating`): the amplitude doubles with each, up to 1. ``amplitude``
    is the one in use now, ``largest`` the largest one sent so far (0 before the first
    probe).
    """

    def __init__(
        self,
        oracle: Oracle,
        amplitude: float,
        *,
        seed: Seed = None,
        caught: Callable[[], int] | None = None,
    ) -> None:
        super().__init__(oracle)
        if not (np.isfinite(amplitude) and 0.0 < amplitude <= 1.0):
            raise ConfigError(f"blinding amplitude must be in (0, 1], got {amplitude}")
        self.start = float(amplitude)
        self.caught = caught
        self.largest = 0.0
        self.rng = rng_from(seed)

    @property
    def amplitude(self) -> float:
        """The noise amplitude now: the start, doubled each time the attacker was caught."""
        times = 0 if self.caught is None else self.caught()
        return min(self.start * 2.0**times, 1.0)

    def query(self, x: np.ndarray) -> Response:
        """Send ``x`` plus fresh noise."""
        x = np.asarray(x, dtype=np.float32)
        a = self.amplitude
        self.largest = max(self.largest, a)
        noise = self.rng.uniform(-a, a, size=x.shape)
        return self.inner.query(np.clip(x + noise, 0.0, 1.0).astype(np.float32))


class Rotating:
    """Many accounts: queries go through ``oracles[i]`` (one per API account) until that
    account is refused for its own sake — rate limited (429) or blocked (403) — and the
    refused batch is then re-sent through the next one.

    The Sybil attacker against per-account guards (rate limits, the query detector).
    ``n_queries`` is the sum over the accounts; ``accounts_used`` how many it has opened;
    ``blocked`` how many of them the service blocked (what tells an attacker its probes
    were recognised, unlike a rate limit).
    A refusal is raised, not rotated, by the last account and by an account that has
    answered nothing yet: a fresh account refusing says the batch itself is refused (too
    large for any account's allowance, or near duplicates of itself), so the caller must
    split or change it rather than burn the remaining accounts. ``changes_when_blocked``:
    the accounts change a batch before re-sending it after a block (the escalating
    blinding of :func:`escalating`), so a fresh account's block moves on too.
    ``answered_before`` (one count per account, default none) is what each account
    answered before this object existed — in an earlier run that this one resumes — so
    an account the service refuses from the start because of that earlier use (blocked,
    or its rate limit spent) is moved past, not mistaken for a fresh one.
    """

    def __init__(
        self,
        oracles: Sequence[Oracle],
        *,
        changes_when_blocked: bool = False,
        answered_before: Sequence[int] = (),
    ) -> None:
        if not oracles:
            raise ConfigError("Rotating needs at least one oracle (one per account)")
        if answered_before and len(answered_before) != len(oracles):
            raise ConfigError(
                f"Rotating: answered_before needs one count per account ({len(oracles)}), "
                f"got {len(answered_before)}"
            )
        self.changes_when_blocked = changes_when_blocked
        self.oracles = list(oracles)
        self.answered_before = [int(n) for n in answered_before] or [0] * len(self.oracles)
        self.current = 0
        self.blocked = 0

    @property
    def info(self) -> OracleInfo:
        """The first account's view of the model (every account sees the same)."""
        return self.oracles[0].info

    @property
    def n_queries(self) -> int:
        """Inputs answered through every account."""
        return sum(o.n_queries for o in self.oracles)

    @property
    def accounts_used(self) -> int:
        """Accounts opened so far (the current one included)."""
        return self.current + 1

    def query(self, x: np.ndarray) -> Response:
        """Answer ``x`` through the current account, moving on while accounts refuse."""
        while True:
            try:
                return self.oracles[self.current].query(x)
            except (RateLimited, Blocked) as exc:
                spent = (
                    self.oracles[self.current].n_queries > 0
                    or self.answered_before[self.current] > 0
                )
                changes = self.changes_when_blocked and isinstance(exc, Blocked)
                if not (spent or changes) or self.current + 1 >= len(self.oracles):
                    raise
                self.blocked += isinstance(exc, Blocked)
                self.current += 1


def escalating(
    oracles: Sequence[Oracle],
    amplitude: float,
    *,
    seed: Seed = None,
    answered_before: Sequence[int] = (),
) -> Rotating:
    """The blinding Sybil: a :class:`Rotating` over the accounts whose probes carry
    fresh noise of ``amplitude`` doubled each time the service has blocked one of them
    (403: the detector saw through the noise), up to 1 (``answered_before``: as in
    :class:`Rotating`).

    The noise is added per account, under the rotation, so a batch refused by a blocked
    account is re-sent to the next one with the raised noise (even when the blocked
    account was fresh: the batch itself was seen through). A rate-limited account (429)
    says nothing about detection and raises nothing.
    """
    rngs = rng_from(seed).spawn(len(oracles))
    rotating = Rotating(
        [
            Blinded(o, amplitude, seed=rng, caught=lambda: rotating.blocked)
            for o, rng in zip(oracles, rngs, strict=True)
        ],
        changes_when_blocked=True,
        answered_before=answered_before,
    )
    return rotating


def one_attacker(
    accounts: Sequence[Oracle],
    *,
    escalate: float | None = None,
    seed: Seed = None,
    answered_before: Sequence[int] = (),
) -> Oracle:
    """One attacker's oracle over its API accounts: the only one; with ``escalate`` (a
    starting noise amplitude) and several accounts the blinding Sybil
    (:func:`escalating`); otherwise a :class:`Rotating` that moves to the next account
    when one is refused (``answered_before``: as in :class:`Rotating`)."""
    if escalate is not None and len(accounts) > 1:
        return escalating(accounts, escalate, seed=seed, answered_before=answered_before)
    if len(accounts) == 1:
        return accounts[0]
    return Rotating(list(accounts), answered_before=answered_before)


def largest_blinding(oracle: object) -> float | None:
    """The largest blinding noise ``oracle`` sent: a :class:`Blinded`'s, or the largest
    over a :class:`Rotating`'s blinded accounts (None: no blinded probe sent)."""
    parts = oracle.oracles if isinstance(oracle, Rotating) else [oracle]
    return max((float(getattr(o, "largest", 0.0)) for o in parts), default=0.0) or None
