"""The query detector: fingerprints, near duplicates, flags and blocking."""

from __future__ import annotations

from itertools import pairwise
from types import ModuleType

import numpy as np
import pytest

from mlinvert.defenses import Predictor, detector
from mlinvert.defenses.detector import (
    DetectorConfig,
    HistoryStore,
    MemoryFlags,
    MemoryHistory,
    QueryDetector,
    Recorded,
    RedisHistory,
    fingerprints,
    parse_detector,
)
from mlinvert.errors import Blocked, ConfigError, OracleError, RateLimited
from mlinvert.oracle import LocalOracle
from mlinvert.service.runner import RedisServer


def _faces(n: int, seed: int = 0) -> np.ndarray:
    """Smooth random 'photos' (distinct low-frequency images, like different faces)."""
    rng = np.random.default_rng(seed)
    small = rng.random((n, 6, 5))
    big = np.kron(small, np.ones((8, 8)))[:, :46, :38]
    return np.clip(big + rng.normal(0, 0.05, big.shape), 0, 1).astype(np.float32)


@pytest.mark.parametrize(
    ("spec", "action", "after"),
    [
        ("detect", "flag", 100),
        ("detect:block", "block", 100),
        ("detect:flag:500", "flag", 500),
        ("detect:7", "flag", 7),
        (" DETECT:BLOCK:3 ", "block", 3),
    ],
)
def test_parse_detector(spec: str, action: str, after: int) -> None:
    cfg = parse_detector(spec)
    assert (cfg.action, cfg.after) == (action, after)
    assert parse_detector(cfg.name) == cfg


@pytest.mark.parametrize(
    "spec",
    [
        "detect:\u00b2",
        "detector",
        "detect:stop",
        "detect:5:block",
        "detect:0",
        "detect:flag:block",
        "detect:1:2",
        "detect:block:-3",
        "",
    ],
)
def test_parse_detector_rejects_with_the_grammar(spec: str) -> None:
    with pytest.raises(ConfigError, match="detect"):
        parse_detector(spec)


def test_config_rejects_bad_values() -> None:
    with pytest.raises(ConfigError, match="match"):
        DetectorConfig(match=0.0)
    with pytest.raises(ConfigError, match="step"):
        DetectorConfig(step=0.001)


def test_fingerprints_equal_a_direct_window_hash() -> None:
    """Each window hash is the polynomial hash of its levels, read off prefix sums."""
    from mlinvert.defenses.detector import _BASE, _mix

    x = _faces(2)
    cfg = DetectorConfig(window=7, hashes=30)
    got = fingerprints(x, cfg)
    levels = np.floor(x[1].reshape(-1) / np.float32(cfg.step)).astype(np.uint64)
    weights = np.array([pow(_BASE, j, 2**64) for j in range(7)], dtype=np.uint64)
    with np.errstate(over="ignore"):
        direct = [int((levels[i : i + 7] * weights).sum()) for i in range(len(levels) - 6)]
        want = np.unique(_mix(np.array(direct, dtype=np.uint64)))[:30]
    assert np.array_equal(got[1], want)
    assert [len(f) for f in got] == [30, 30]


def test_small_input_keeps_what_it_has() -> None:
    """An input shorter than the window is one window; few distinct windows, short print."""
    cfg = DetectorConfig()
    (fp,) = fingerprints(np.full((1, 3, 4), 0.5, dtype=np.float32), cfg)
    assert len(fp) == 1
    (fp,) = fingerprints(np.zeros((1, 40, 40), dtype=np.float32), cfg)
    assert len(fp) == 1  # a flat image: every window is the same


def test_probes_are_near_duplicates_and_different_photos_are_not() -> None:
    rng = np.random.default_rng(1)
    photos = _faces(60)
    det = QueryDetector(DetectorConfig(after=10**6))
    det.check("honest", photos, 0.0)
    assert det.status("honest") == {"inputs": 60, "near_duplicates": 0}
    base = photos[0]
    # an attack's probes: one photo plus small smooth steps (as in a low-dimensional prior)
    steps = np.kron(rng.normal(0, 0.01, (60, 6, 5)), np.ones((8, 8)))[:, :46, :38]
    probes = np.clip(base + steps, 0, 1).astype(np.float32)
    det.check("mallory", probes, 0.0)
    # most probes repeat half the windows of an earlier one (measured: 45 of 59)
    assert det.status("mallory")["near_duplicates"] >= 40


def test_an_account_is_flagged_after_enough_near_duplicates_and_others_are_not(
    toys: ModuleType,
) -> None:
    flags = MemoryFlags()
    det = QueryDetector(DetectorConfig(after=20), flags)
    pred = Predictor(toys.ToySoftmax((46, 38)), name="m", guards=[det], clock=lambda: 42.0)
    honest = LocalOracle(pred, account="alice")
    mallory = LocalOracle(pred, account="mallory")
    photos = _faces(40, seed=3)
    honest.query(photos)
    base = photos[:1]
    for _ in range(3):  # flag mode keeps answering
        mallory.query(np.repeat(base, 10, axis=0))
    flag = flags.flagged("mallory")
    # counted per batch: the third batch of ten crossed 20 (9 + 10 + 10)
    assert flag is not None and flag.at == 42.0 and flag.near_duplicates == 29
    assert "29 of the 30 inputs" in flag.detail and flag.inputs == 30
    assert flags.flagged("alice") is None


def test_block_mode_refuses_the_crossing_batch_and_everything_after(toys: ModuleType) -> None:
    flags = MemoryFlags()
    det = QueryDetector("detect:block:15", flags)
    pred = Predictor(toys.ToySoftmax((46, 38)), name="m", guards=[det])
    mallory = LocalOracle(pred, account="mallory")
    x = np.repeat(_faces(1), 10, axis=0)
    mallory.query(x)  # 9 near duplicates: answered
    with pytest.raises(Blocked, match="mlinvert keys unflag mallory"):
        mallory.query(x)
    with pytest.raises(Blocked):
        mallory.query(_faces(1, seed=9))  # even a fresh photo: the account is blocked
    LocalOracle(pred, account="alice").query(_faces(5, seed=9))  # others unaffected
    flags.unflag("mallory")
    mallory.query(_faces(1, seed=9))  # cleared: answered, and counting starts afresh
    assert det.status("mallory")["near_duplicates"] == 0


def test_history_forgets_old_inputs_and_bounds_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(detector, "_MERGE_EVERY", 1)  # merge into the sorted store each time
    det = QueryDetector(DetectorConfig(after=10**6, history=5))
    photos = _faces(12, seed=4)
    det.check("a", photos[:1], 0.0)
    det.check("a", photos[1:7], 0.0)  # pushes the first photo out of the history
    det.check("a", photos[:1], 0.0)
    assert det.status("a")["near_duplicates"] == 0
    det.check("a", photos[6:7], 0.0)  # still remembered
    assert det.status("a")["near_duplicates"] == 1
    for i in range(8, 12):  # one at a time: the store is compacted as inputs age out
        det.check("a", photos[i : i + 1], 0.0)
    assert isinstance(det.history, MemoryHistory)
    state = det.history._accounts["a"]
    assert state.inputs == 13 and state.ids.min() >= 13 - 5 - 1
    assert len(state.keys) == len(state.ids) <= 6 * 50
    assert np.all(np.diff(state.keys.astype(np.float64)) >= 0)  # still sorted


@pytest.mark.parametrize("history", [10_000, 40])
def test_waiting_hashes_and_the_sorted_store_decide_alike(
    monkeypatch: pytest.MonkeyPatch, history: int
) -> None:
    """Merging every input or every 256 gives the same near duplicates, input by input."""
    rng = np.random.default_rng(7)
    base = _faces(1, seed=8)
    steps = np.kron(rng.normal(0, 0.01, (300, 6, 5)), np.ones((8, 8)))[:, :46, :38]
    stream = np.concatenate([_faces(100, seed=9), np.clip(base + steps, 0, 1)])
    stream = stream[rng.permutation(len(stream))].astype(np.float32)
    counts = []
    for every in (1, 7, 256):
        monkeypatch.setattr(detector, "_MERGE_EVERY", every)
        det = QueryDetector(DetectorConfig(after=10**6, history=history))
        seen = []
        for i in range(0, len(stream), 5):
            det.check("a", stream[i : i + 5], 0.0)
            seen.append(det.status("a")["near_duplicates"])
        counts.append(seen)
    assert counts[0] == counts[1] == counts[2]
    assert counts[0][-1] > 100  # of the 300 probes (fewer with a 40-input history)


def test_a_flat_input_is_not_a_near_duplicate_of_everything() -> None:
    """A blank image has one distinct window; it must share half of a full print."""
    det = QueryDetector(DetectorConfig(after=10**6))
    photos = _faces(20, seed=10)
    photos[:, :10, :] = 0.0  # every photo has a flat band, so a blank window is common
    det.check("a", photos, 0.0)
    det.check("a", np.zeros((3, 46, 38), dtype=np.float32), 0.0)
    assert det.status("a")["near_duplicates"] == 0


def test_per_hash_cap_still_finds_the_latest_near_duplicate() -> None:
    """Thousands of inputs sharing windows: only the latest per hash are looked at."""
    det = QueryDetector(DetectorConfig(after=10**6, per_hash=4))
    x = np.repeat(_faces(1, seed=5), 300, axis=0)
    det.check("a", x[:150], 0.0)
    for i in range(150, 300, 10):
        det.check("a", x[i : i + 10], 0.0)
    assert det.status("a") == {"inputs": 300, "near_duplicates": 299}


def _synthetic(seed: int, n: int = 240) -> tuple[DetectorConfig, list[np.ndarray], list[int], int]:
    """A stream of fingerprints drawn from a small alphabet, so that ``per_hash`` and
    ``history`` both bite: (config, fingerprints, batch sizes, need)."""
    rng = np.random.default_rng(seed)
    alphabet = rng.integers(1, 2**63, size=int(rng.integers(12, 50)), dtype=np.uint64)
    size = int(rng.integers(4, 10))
    config = DetectorConfig(
        after=int(rng.integers(3, 30)),
        history=int(rng.integers(3, 40)),
        per_hash=int(rng.integers(1, 7)),
        hashes=size,
    )
    prints = [np.sort(rng.choice(alphabet, size=size, replace=False)) for _ in range(n)]
    sizes: list[int] = []
    while sum(sizes) < n:
        sizes.append(min(n - sum(sizes), int(rng.integers(1, 40))))
    return config, prints, sizes, int(rng.integers(1, size + 1))


def _replay(history: HistoryStore, account: str, seed: int) -> list[Recorded]:
    config, prints, sizes, need = _synthetic(seed)
    at = np.cumsum([0, *sizes])
    return [history.record(account, prints[a:b], need, config) for a, b in pairwise(at)]


@pytest.mark.parametrize("seed", range(6))
def test_memory_history_looks_at_the_latest_per_hash_inputs_wherever_they_wait(
    monkeypatch: pytest.MonkeyPatch, seed: int
) -> None:
    """The ``per_hash`` latest inputs of a hash are counted across the waiting dict and
    the sorted store together, so when the merge happens changes nothing."""
    runs = []
    for every in (1, 7, 256):
        monkeypatch.setattr(detector, "_MERGE_EVERY", every)
        runs.append(_replay(MemoryHistory(), "a", seed))
    assert runs[0] == runs[1] == runs[2]
    assert any(r.near for r in runs[0])


@pytest.mark.redis
@pytest.mark.parametrize("first_look", [32, 2])
def test_redis_history_decides_input_by_input_like_memory(
    monkeypatch: pytest.MonkeyPatch, redis_url: str, first_look: int
) -> None:
    """Twelve synthetic streams (small history and per_hash, batches of 1 to 39): the
    same near duplicates input by input, the same crossings, the same status."""
    monkeypatch.setattr(detector, "_FIRST_LOOK", first_look)  # 2: the deep scan runs too
    shared = RedisHistory(redis_url, prefix=f"t-eq{first_look}:")
    crossings = 0
    for seed in range(12):
        config = _synthetic(seed)[0]
        memory = MemoryHistory()
        want, got = _replay(memory, "a", seed), _replay(shared, f"a{seed}", seed)
        assert got == want, f"stream {seed} ({config})"
        assert shared.status(f"a{seed}", config) == memory.status("a", config)
        crossings += sum(r.crossed is not None for r in want)
    assert crossings > 10


def _probe_stream(seed: int = 0) -> list[np.ndarray]:
    """Batches an attacker and an honest user of one account send: finite-difference
    probes (a basis step of 0.02 on a pixel block), NES probes (Gaussian noise of 0.01
    around the current image) and distinct photos, the attack image moving between rounds."""
    rng = np.random.default_rng(seed)
    image = _faces(1, seed=seed)[0]
    batches = []
    for round_ in range(6):
        blocks = rng.integers(0, [46 - 4, 38 - 4], size=(24, 2))
        fd = np.repeat(image[None], 24, axis=0)
        for i, (y, x) in enumerate(blocks):
            fd[i, y : y + 4, x : x + 4] += 0.02
        nes = image[None] + rng.normal(0, 0.01, (16, *image.shape))
        batches += [fd, nes, _faces(10, seed=100 + round_)]
        image = np.clip(image + rng.normal(0, 0.03, image.shape), 0, 1)
    return [np.clip(b, 0, 1).astype(np.float32) for b in batches]


@pytest.mark.redis
@pytest.mark.parametrize(("history", "per_hash"), [(40, 3), (10_000, 1024)])
def test_redis_history_flags_a_probe_attack_where_memory_does(
    redis_url: str, history: int, per_hash: int
) -> None:
    config = DetectorConfig(after=25, history=history, per_hash=per_hash)
    memory = QueryDetector(config)
    shared = QueryDetector(config, history=RedisHistory(redis_url, prefix=f"t-fd{history}:"))
    counts: list[tuple[dict[str, int], dict[str, int]]] = []
    flags: list[tuple[object, object]] = []
    for t, batch in enumerate(_probe_stream()):
        memory.check("eve", batch, float(t))
        shared.check("eve", batch, float(t))
        counts.append((memory.status("eve"), shared.status("eve")))
        flags.append((memory.flags.flagged("eve"), shared.flags.flagged("eve")))
        for det in (memory, shared):
            assert isinstance(det.flags, MemoryFlags)
            det.flags.unflag("eve")
    assert [m for m, _ in counts] == [r for _, r in counts]
    assert [m for m, _ in flags] == [r for _, r in flags]
    assert sum(m is not None for m, _ in flags) >= 3  # the attack is flagged again and again
    assert counts[-1][0]["inputs"] == 6 * 50


@pytest.mark.redis
def test_two_redis_histories_see_one_account(redis_url: str) -> None:
    """Two detectors (two service processes) on one Redis: an attacker alternating
    between them is flagged at the input one detector alone would flag it."""
    config = DetectorConfig(after=30)
    alone = QueryDetector(config)
    flags = MemoryFlags()  # the service's shared SQLite store
    pair = [
        QueryDetector(config, flags, RedisHistory(redis_url, prefix="t-pair:")) for _ in range(2)
    ]
    split = [QueryDetector(config) for _ in range(2)]  # per-process memory: the gap
    for t, batch in enumerate(_probe_stream(seed=3)):
        alone.check("eve", batch, float(t))
        pair[t % 2].check("eve", batch, float(t))
        split[t % 2].check("eve", batch, float(t))
        if alone.flags.flagged("eve") is not None:
            break
    want = alone.flags.flagged("eve")
    assert want is not None and flags.flagged("eve") == want
    assert all(d.flags.flagged("eve") is None for d in split)
    assert pair[0].status("eve") == pair[1].status("eve") == alone.status("eve")


@pytest.mark.redis
def test_redis_history_forgets_old_inputs_and_expires(redis_url: str) -> None:
    """Memory stays bounded by ``history``: leaving inputs' hashes are removed, every key
    has a ttl, and forget() deletes the account."""
    import redis

    config = DetectorConfig(after=10**6, history=5)
    history = RedisHistory(redis_url, prefix="t-bound:", ttl=60.0)
    det = QueryDetector(config, history=history)
    photos = _faces(40, seed=4)
    for i in range(0, 40, 3):
        det.check("a", photos[i : i + 3], 0.0)
    client = redis.Redis.from_url(redis_url)
    counters, ring, buckets = history.keys("a", config)
    bucket_keys: list[str | bytes] = list(client.scan_iter(match=buckets + "*"))
    remembered = sum(client.hlen(k) for k in bucket_keys)
    assert 5 * 40 <= remembered <= 6 * 50  # the latest 6 inputs' hashes, no more
    assert client.llen(ring) == 6
    assert all(0 < client.pttl(k) <= 60_000 for k in [counters, ring, *bucket_keys])
    det.check("a", photos[39:40], 0.0)  # still remembered
    assert det.status("a") == {"inputs": 41, "near_duplicates": 1}
    det.check("a", photos[30:31], 0.0)  # forgotten: more than 5 inputs ago
    assert det.status("a") == {"inputs": 42, "near_duplicates": 1}
    assert history.forget("a", config) == 2 + len(bucket_keys)
    assert det.status("a") == {"inputs": 0, "near_duplicates": 0}


@pytest.mark.redis
def test_redis_history_fails_closed() -> None:
    try:
        server = RedisServer()
    except ConfigError as exc:
        pytest.skip(f"redis-server binary absent: {exc}")
    with server:
        det = QueryDetector("detect:block:5", history=RedisHistory(server.url, prefix="t-down:"))
        det.check("a", _faces(2), 0.0)
    with pytest.raises(RateLimited, match=r"unreachable.*retry in a second") as info:
        det.check("a", _faces(2), 1.0)
    assert info.value.retry_after == 1.0
    with pytest.raises(OracleError, match="check that redis-server runs"):
        det.status("a")


def test_redis_history_refuses_a_history_its_ids_cannot_hold() -> None:
    history = RedisHistory("redis://127.0.0.1:1/0")  # never connected
    with pytest.raises(ConfigError, match="at most 2\\*\\*31"):
        history.keys("a", DetectorConfig(history=2**31))
    with pytest.raises(ConfigError, match="at most 65535 hashes"):
        history.keys("a", DetectorConfig(hashes=2**16))
    with pytest.raises(ConfigError, match="ttl"):
        RedisHistory("redis://127.0.0.1:1/0", ttl=0.0)
