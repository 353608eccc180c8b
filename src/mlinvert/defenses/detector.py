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

The fingerprints live in a :class:`HistoryStore`: :class:`MemoryHistory` (this process
only) or :class:`RedisHistory` (one atomic Lua script per batch, so every service
process using that Redis sees all of an account's inputs, as ``mlinvert serve --redis``
does; if Redis cannot be reached a batch is refused with RateLimited, HTTP 429; an
account idle for a day is forgotten). Both decide input by input alike: input ``q`` is a
near duplicate when one input among ``q - history`` .. ``q - 1`` shares the required
number of ``q``'s hashes, counting a shared hash only when that input is among the
``per_hash`` latest inputs with that hash value.

It is meant for images: the service gives survey (tabular) models none. What it cannot
see (measured in BENCHMARKS.md, "Query detector"): an attacker spreading the probes over
many accounts, blinding each probe with noise of about ``step`` / 4 or more, or sending
``history`` other inputs between two probes.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
import threading
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Protocol

import numpy as np

from mlinvert.defenses.ratelimit import redis_client
from mlinvert.errors import Blocked, ConfigError, OracleError, RateLimited

log = logging.getLogger(__name__)

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
    (in memory 16 bytes per hash: 8 MB per account at 10 000 inputs of 50 hashes; for
    Redis see :class:`RedisHistory`); ``per_hash``
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


@dataclass(frozen=True)
class Recorded:
    """What one batch did to an account's history.

    ``near`` says, input by input, which were near duplicates; ``inputs`` is the
    account's input count after the batch; ``crossed`` is the near-duplicate count at the
    moment the batch took it to ``after`` or beyond (the count then restarts at 0), or
    None when it did not.
    """

    near: tuple[bool, ...]
    inputs: int
    crossed: int | None


class HistoryStore(Protocol):
    """Where an account's fingerprints and counts live; ``record`` is atomic per batch.

    Both stores decide alike: input ``q`` is a near duplicate when one of the account's
    inputs ``q - history`` .. ``q - 1`` is among the ``per_hash`` latest inputs of at
    least ``need`` of ``q``'s hashes; the count of near duplicates is compared with
    ``after`` once per batch.
    """

    def record(
        self, account: str, prints: Sequence[np.ndarray], need: int, config: DetectorConfig
    ) -> Recorded:
        """Match each fingerprint, in order, against the history, then remember it."""
        ...

    def status(self, account: str, config: DetectorConfig) -> dict[str, int]:
        """``inputs`` seen and ``near_duplicates`` counted since the account's last flag."""
        ...


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


class MemoryHistory:
    """Fingerprints in this process's memory (thread-safe, not shared across processes).

    16 bytes per remembered hash: 8 MB per account at 10 000 inputs of 50 hashes.
    """

    def __init__(self) -> None:
        self._accounts: dict[str, _History] = {}
        self._lock = threading.Lock()

    def record(
        self, account: str, prints: Sequence[np.ndarray], need: int, config: DetectorConfig
    ) -> Recorded:
        """Match and remember the batch under one lock."""
        near: list[bool] = []
        with self._lock:
            state = self._accounts.setdefault(account, _History())
            for fp in prints:
                qid = state.inputs
                state.inputs += 1
                near.append(self._is_near_duplicate(state, fp, qid, need, config))
                state.near += near[-1]
                for h in fp.tolist():
                    state.recent.setdefault(h, []).append(qid)
                state.pending.append(fp)
            if len(state.pending) >= _MERGE_EVERY:
                self._merge(state, config)
            crossed = None
            if state.near >= config.after:
                crossed, state.near = state.near, 0  # a cleared account starts counting afresh
            return Recorded(near=tuple(near), inputs=state.inputs, crossed=crossed)

    def status(self, account: str, config: DetectorConfig) -> dict[str, int]:
        """Inputs remembered and near duplicates counted since the account's last flag."""
        with self._lock:
            state = self._accounts.get(account)
            if state is None:
                return {"inputs": 0, "near_duplicates": 0}
            return {"inputs": state.inputs, "near_duplicates": state.near}

    @staticmethod
    def _is_near_duplicate(
        state: _History, fp: np.ndarray, qid: int, need: int, cfg: DetectorConfig
    ) -> bool:
        """Does ``fp`` share ``need`` hashes with one remembered input?

        Per hash only its ``per_hash`` latest inputs are looked at, whether they wait in
        ``recent`` or were merged into the sorted store (an attack repeats a background
        window thousands of times); inputs older than ``history`` are ignored.
        """
        within = state.recent
        lo = np.searchsorted(state.keys, fp, side="left")
        hi = np.searchsorted(state.keys, fp, side="right")
        hashes = fp.tolist()
        waiting_all = [within.get(h, ()) for h in hashes]
        n_waiting = np.fromiter((len(w) for w in waiting_all), dtype=np.int64, count=len(hashes))
        if int(((hi > lo) | (n_waiting > 0)).sum()) < need:
            return False
        available = hi - lo + n_waiting
        # most near duplicates repeat one of the latest inputs: look at those first
        for depth in sorted({min(_FIRST_LOOK, cfg.per_hash), cfg.per_hash}):
            # the ``depth`` latest per hash: the waiting ones first, then the store's
            start = np.maximum(lo, hi - np.maximum(depth - n_waiting, 0))
            parts = [state.ids[a:b] for a, b in zip(start.tolist(), hi.tolist(), strict=True)]
            waiting = [i for w in waiting_all for i in w[-depth:]]
            ids = np.concatenate([*parts, np.asarray(waiting, dtype=np.int64)])
            ids = ids[ids >= qid - cfg.history]
            if ids.size >= need and int(np.bincount(ids - ids.min()).max()) >= need:
                return True
            if not bool((available > depth).any()):
                return False
        return False

    @staticmethod
    def _merge(state: _History, cfg: DetectorConfig) -> None:
        """Merge the waiting hashes into the sorted store; compact away forgotten inputs."""
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


#: One batch in one atomic call. KEYS: the account's counters (hash) and ring (list);
#: ARGV: history, per_hash, first look, after, need, buckets, ttl ms, the fingerprints
#: (per input: 2-byte count, then 8-byte hashes), the bucket key prefix. The ring is a
#: list of the fingerprints (8-byte hashes) of the account's last ``history`` + 1 inputs.
_LUA_RECORD = """
local history = tonumber(ARGV[1])
local per_hash = tonumber(ARGV[2])
local first_look = tonumber(ARGV[3])
local after = tonumber(ARGV[4])
local need = tonumber(ARGV[5])
local buckets = tonumber(ARGV[6])
local ttl = tonumber(ARGV[7])
local blob = ARGV[8]
local prefix = ARGV[9]
local WRAP = 4294967296
local state = redis.call('HMGET', KEYS[1], 'inputs', 'near')
local inputs = tonumber(state[1]) or 0
local near = tonumber(state[2]) or 0

-- Stored per hash: the 4-byte ids (big-endian, modulo 2^32) of its latest inputs,
-- newest first. In this script a hash is read once into a list: ``old`` the stored
-- string, of which the ``n_old`` newest ids are still valid (``dec`` decodes them
-- lazily), and ``new`` the ids appended by this batch, oldest first, ``first`` to
-- ``last``.
local lists = {}
local function list(h)
  local l = lists[h]
  if l == nil then
    local a, b, c = string.byte(h, 6, 8)  -- the low bits: a print's high bits are small
    local key = prefix .. ((a * 65536 + b * 256 + c) % buckets)
    local old = redis.call('HGET', key, h) or ''
    l = {key = key, old = old, n_old = #old / 4, new = {}, first = 1, last = 0, dirty = false}
    lists[h] = l
  end
  return l
end
local function decoded(l)
  local dec = l.dec
  if dec == nil then
    dec = {}
    local old = l.old
    for i = 1, l.n_old do
      local a, b, c, d = string.byte(old, 4 * i - 3, 4 * i)
      dec[i] = ((a * 256 + b) * 256 + c) * 256 + d
    end
    l.dec = dec
  end
  return dec
end
local function drop_oldest(l)
  if l.n_old > 0 then
    l.n_old = l.n_old - 1
  else
    l.new[l.first] = nil
    l.first = l.first + 1
  end
  l.dirty = true
end
local function oldest(l)
  if l.n_old > 0 then
    return decoded(l)[l.n_old]
  end
  return l.new[l.first]
end
local function size(l)
  return l.n_old + l.last - l.first + 1
end
local function at(l, i)  -- the i-th newest id of a list
  local n_new = l.last - l.first + 1
  if i <= n_new then
    return l.new[l.last - i + 1]
  end
  return decoded(l)[i - n_new]
end
local function within(l, q)  -- how many of the list's ids are within history of q
  local hi = size(l)
  if hi == 0 or (q - at(l, hi)) % WRAP <= history then
    return hi
  end
  local lo = 0  -- ids are newest first: at(lo) is within (or lo = 0), at(hi) is not
  while hi - lo > 1 do
    local mid = math.floor((lo + hi) / 2)
    if (q - at(l, mid)) % WRAP <= history then lo = mid else hi = mid end
  end
  return lo
end
local function has(l, e, q, d)  -- is the id at distance d among the list's e newest?
  local lo, hi = 1, e
  while lo <= hi do
    local mid = math.floor((lo + hi) / 2)
    local dm = (q - at(l, mid)) % WRAP
    if dm == d then return true end
    if dm < d then lo = mid + 1 else hi = mid - 1 end
  end
  return false
end
-- Is one id among the ``depth`` latest valid ids of ``need`` of the lists (``valid[k]``
-- of list k are within history)? An id in need of n lists is in one of any n - need + 1
-- of them: count the ids of the n - need + 1 shortest lists (the candidates), then go
-- through the others, longest last, dropping the candidates that can no longer reach
-- need; once few are left, look them up (binary search: ids are in arrival order).
local function scan(ls, valid, q, depth)
  local n = #ls
  local order = {}
  for k = 1, n do
    order[k] = {l = ls[k], e = math.min(valid[k], depth)}
  end
  table.sort(order, function(a, b) return a.e < b.e end)
  local s = n - need + 1
  local counts, alive = {}, {}
  for k = 1, s do
    local l, e = order[k].l, order[k].e
    local new, last = l.new, l.last
    local n_new = math.min(e, last - l.first + 1)
    for i = last, last - n_new + 1, -1 do
      local id = new[i]
      local c = (counts[id] or 0) + 1
      if c >= need then return true end
      if c == 1 then alive[#alive + 1] = id end
      counts[id] = c
    end
    if e > n_new then
      local dec = decoded(l)
      for i = 1, e - n_new do
        local id = dec[i]
        local c = (counts[id] or 0) + 1
        if c >= need then return true end
        if c == 1 then alive[#alive + 1] = id end
        counts[id] = c
      end
    end
  end
  local rest = 0
  for k = s + 1, n do
    rest = rest + order[k].e
  end
  for k = s + 1, n do
    local left = n - k + 1
    local kept = {}
    for _, id in ipairs(alive) do
      if counts[id] + left >= need then kept[#kept + 1] = id end
    end
    alive = kept
    if #alive == 0 then return false end
    if #alive * left * 12 < rest then
      for _, id in ipairs(alive) do
        local c = counts[id]
        local d = (q - id) % WRAP
        for j = k, n do
          if c + n - j + 1 < need then break end
          if has(order[j].l, order[j].e, q, d) then
            c = c + 1
            if c >= need then return true end
          end
        end
      end
      return false
    end
    local l, e = order[k].l, order[k].e
    rest = rest - e
    local new, last = l.new, l.last
    local n_new = math.min(e, last - l.first + 1)
    for i = last, last - n_new + 1, -1 do
      local c = counts[new[i]]
      if c ~= nil then
        if c + 1 >= need then return true end
        counts[new[i]] = c + 1
      end
    end
    if e > n_new then
      local dec = decoded(l)
      for i = 1, e - n_new do
        local c = counts[dec[i]]
        if c ~= nil then
          if c + 1 >= need then return true end
          counts[dec[i]] = c + 1
        end
      end
    end
  end
  return false
end

local verdicts = {}
local pos = 1
while pos < #blob do
  local hi, lo = string.byte(blob, pos, pos + 1)
  local n = hi * 256 + lo
  local record = string.sub(blob, pos, pos + 1 + 8 * n)
  pos = pos + 2 + 8 * n
  local qid = inputs
  inputs = inputs + 1
  local q = qid % WRAP
  -- forget the input that just left the history: it is the oldest id of every list
  local gone = qid - history - 1
  if gone >= 0 then
    local old = redis.call('LPOP', KEYS[2])
    if old then
      local g = gone % WRAP
      for k = 0, math.floor(#old / 8) - 1 do
        local l = list(string.sub(old, 1 + 8 * k, 8 + 8 * k))
        if oldest(l) == g then
          drop_oldest(l)
        end
      end
    end
  end
  local ls, valid = {}, {}
  local present, deeper = 0, false
  local look = math.min(first_look, per_hash)
  for k = 1, n do
    local l = list(string.sub(record, 3 + 8 * (k - 1), 10 + 8 * (k - 1)))
    ls[k] = l
    valid[k] = within(l, q)
    if valid[k] > 0 then
      present = present + 1
    end
    deeper = deeper or valid[k] > look
  end
  local dup = false
  if present >= need then  -- most near duplicates repeat a recent input: look there first
    dup = scan(ls, valid, q, look)
    if not dup and deeper and per_hash > look then
      dup = scan(ls, valid, q, per_hash)
    end
  end
  if dup then
    near = near + 1
    verdicts[#verdicts + 1] = '1'
  else
    verdicts[#verdicts + 1] = '0'
  end
  for k = 1, n do  -- remember this input, keeping the per_hash latest per hash
    local l = ls[k]
    l.last = l.last + 1
    l.new[l.last] = q
    l.dirty = true
    if l.n_old + l.last - l.first + 1 > per_hash then
      drop_oldest(l)
    end
  end
  redis.call('RPUSH', KEYS[2], string.sub(record, 3))
end
for h, l in pairs(lists) do  -- write each changed list back once
  if l.dirty then
    local parts = {}
    local new = l.new
    for i = l.last, l.first, -1 do
      local v = new[i]
      parts[#parts + 1] = string.char(math.floor(v / 16777216), math.floor(v / 65536) % 256,
                                      math.floor(v / 256) % 256, v % 256)
    end
    parts[#parts + 1] = string.sub(l.old, 1, 4 * l.n_old)
    local value = table.concat(parts)
    if value == '' then
      redis.call('HDEL', l.key, h)
    else
      redis.call('HSET', l.key, h, value)
      redis.call('PEXPIRE', l.key, ttl)
    end
  end
end
local crossed = -1
if near >= after then
  crossed = near
  near = 0
end
redis.call('HSET', KEYS[1], 'inputs', inputs, 'near', near)
redis.call('PEXPIRE', KEYS[1], ttl)
redis.call('PEXPIRE', KEYS[2], ttl)
return {crossed, inputs, table.concat(verdicts)}
"""


class RedisHistory:
    """Fingerprints in Redis, matched by one Lua script per batch (atomic), so several
    service processes pointing at the same Redis see all of an account's inputs.

    Decides exactly as :class:`MemoryHistory` (same ``per_hash`` and ``history`` rules,
    batch inputs compared with each other). Per account and detector configuration the
    keys are: a hash of counters (inputs, near duplicates), a ring (list) of the last
    ``history`` + 1 fingerprints (8 bytes per hash, so an input's hashes are forgotten
    when it leaves the history: memory stays bounded by ``history``), and the
    remembered hash values, each mapped to the 4-byte ids of its ``per_hash`` latest
    inputs (newest first), spread over up to ``history * hashes / 64`` Redis hashes.
    Every key expires ``ttl`` seconds after the last batch that wrote it, so an account
    idle that long starts afresh (the memory history never forgets an idle account).

    Cost, measured with ``benchmarks/detector_eval.py --history`` at the default
    configuration: 7-10 MB of Redis per account after 10 000 inputs (4 MB of it the
    ring; the memory history holds about 8 MB), and about twice the memory history's
    time per batch; the matching runs inside Redis's single thread, shared by every
    process using it: about 0.34 s per batch of 201 NES probes once the account's lists
    are full, 45 ms per 64 distinct photos.
    """

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "mlinvert:det:",
        ttl: float = 86_400.0,
        client: Any = None,
    ) -> None:
        if not (math.isfinite(ttl) and ttl >= 1.0):
            raise ConfigError(f"the detector history's ttl must be >= 1 second, got {ttl!r}")
        self.url = url
        self.prefix = prefix
        self.ttl = ttl
        self.client = client if client is not None else redis_client(url)
        self._script = self.client.register_script(_LUA_RECORD)

    def keys(self, account: str, config: DetectorConfig) -> tuple[str, str, str]:
        """The account's counters key, ring key and bucket key prefix under ``config``."""
        if config.history >= 2**31:
            raise ConfigError(
                f"a Redis detector history holds at most 2**31 - 1 inputs, got {config.history}"
            )
        if config.hashes >= 2**16:
            raise ConfigError(
                f"a Redis detector history keeps at most 65535 hashes per input, got "
                f"{config.hashes}"
            )
        base = f"{self.prefix}{_config_digest(config)}:{{{account}}}:"
        return base + "n", base + "r", base + "b:"

    def record(
        self, account: str, prints: Sequence[np.ndarray], need: int, config: DetectorConfig
    ) -> Recorded:
        """Match and remember the batch in one EVALSHA.

        Fails closed: if Redis cannot be reached the batch is refused with RateLimited
        (retry after 1 s), never answered unwatched.
        """
        import redis

        counters, ring, buckets = self.keys(account, config)
        blob = b"".join(len(fp).to_bytes(2, "big") + fp.astype(">u8").tobytes() for fp in prints)
        args = [
            config.history,
            config.per_hash,
            _FIRST_LOOK,
            config.after,
            need,
            _n_buckets(config),
            math.ceil(self.ttl * 1000),
            blob,
            buckets,
        ]
        try:
            crossed, inputs, verdicts = self._script(keys=[counters, ring], args=args)
        except redis.RedisError as exc:
            log.error("detector history store %s failed: %s", self.url, exc)
            down = isinstance(exc, (redis.ConnectionError, redis.TimeoutError))
            raise RateLimited(
                "the query detector's history store (Redis) is "
                + ("unreachable" if down else "failing")
                + f" ({type(exc).__name__}); the batch was refused, retry in a second",
                retry_after=1.0,
            ) from None
        return Recorded(
            near=tuple(c == ord("1") for c in bytes(verdicts)),
            inputs=int(inputs),
            crossed=None if int(crossed) < 0 else int(crossed),
        )

    def status(self, account: str, config: DetectorConfig) -> dict[str, int]:
        """The account's counters, read from Redis (OracleError if it cannot be reached)."""
        import redis

        try:
            inputs, near = self.client.hmget(self.keys(account, config)[0], "inputs", "near")
        except redis.RedisError as exc:
            raise OracleError(
                f"the query detector's history store {self.url} cannot be read "
                f"({type(exc).__name__}: {exc}); check that redis-server runs there"
            ) from None
        return {"inputs": int(inputs or 0), "near_duplicates": int(near or 0)}

    def forget(self, account: str, config: DetectorConfig) -> int:
        """Delete the account's keys under ``config``; how many there were."""
        counters, ring, buckets = self.keys(account, config)
        doomed = [counters, ring, *self.client.scan_iter(match=_glob(buckets) + "*", count=1000)]
        return int(self.client.delete(*doomed))


def _config_digest(config: DetectorConfig) -> str:
    """Twelve hex digits naming what the history depends on (all but ``action``)."""
    fields_ = {k: v for k, v in asdict(config).items() if k != "action"}
    return hashlib.sha1(repr(sorted(fields_.items())).encode()).hexdigest()[:12]


def _n_buckets(config: DetectorConfig) -> int:
    """Redis hashes per account: about 64 remembered hashes each when the history is full."""
    want = max(1, config.history * config.hashes // 64)
    return min(2 ** (want - 1).bit_length(), 2**24)


def _glob(text: str) -> str:
    """``text`` with Redis glob characters escaped."""
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


class QueryDetector:
    """Guard: flags (and with ``action="block"`` refuses) accounts sending near duplicates.

    Blacklight, Li et al., USENIX Security 2022; see the module docstring. Every input
    of a batch the earlier guards admitted is fingerprinted in ``check``, in order, so
    the probes of one batch are compared with each other too. Fingerprints live in
    ``history``: :class:`MemoryHistory` by default (one process: with several service
    processes each would see only its share of an account's inputs) or
    :class:`RedisHistory` (shared by every process using that Redis; the service uses
    it when it has a Redis URL). Flags go to ``flags`` (memory by default, SQLite in the
    service, so every process and a restart see them).
    """

    name = "detector"

    def __init__(
        self,
        config: DetectorConfig | str = "detect",
        flags: FlagStore | None = None,
        history: HistoryStore | None = None,
    ):
        self.config = parse_detector(config) if isinstance(config, str) else config
        self.flags: FlagStore = flags if flags is not None else MemoryFlags()
        self.history: HistoryStore = history if history is not None else MemoryHistory()

    def check(self, account: str, x: np.ndarray, now: float) -> None:
        """Fingerprint the batch, count near duplicates, flag; refuse a blocked account."""
        cfg = self.config
        if cfg.action == "block":
            self._refuse_if_flagged(account)
        need = math.ceil(cfg.match * min(cfg.hashes, _n_windows(x, cfg)))
        recorded = self.history.record(account, fingerprints(x, cfg), need, cfg)
        near, inputs = recorded.crossed, recorded.inputs
        if near is not None and self.flags.flagged(account) is None:
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
        """Inputs seen and near duplicates counted since the account's last flag."""
        return self.history.status(account, self.config)

    def _refuse_if_flagged(self, account: str) -> None:
        flag = self.flags.flagged(account)
        if flag is not None:
            raise Blocked(
                f"account {account!r} is blocked: flagged for investigation by the query "
                f"detector ({flag.detail}); an operator clears it with "
                f"`mlinvert keys unflag {account}`"
            )
