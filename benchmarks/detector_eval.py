"""The query detector (Blacklight-style, mlinvert.defenses.detector) on AT&T faces.

Four measurements, all in process at the default ``DetectorConfig()`` (step 0.2, window
20, 50 hashes, match 0.5, flag after 100 near duplicates):

1. honest traffic: one account per stream, batches of 64 straight into
   ``QueryDetector.check`` (AT&T photos, the same photos re-captured ten times, one photo
   re-captured in a burst, scikit-image's LFW subset faces / non-faces, digits);
2. the audit's own attacks (black-box Broyden under ``full``, black-box NES under
   ``round:2``, label-only) by one account against people 0, 1, 2, ... in turn, in flag
   mode (when is the account flagged) and block mode (how many people before Blocked);
3. query blinding: the black-box attack with independent uniform noise of amplitude
   ``a`` added to every probe, judged by FaceJudge like benchmarks/miface_att.py;
4. overhead: ``Predictor.predict`` throughput with and without the detector, and
   ``fingerprints`` alone;
5. (``--history``, needs redis-server) the memory vs the Redis history side by side on
   the same NES batches of 201 probes: identical decisions, time per batch in process and
   through real services, and the memory one account holds after 10 000 inputs.

    OMP_NUM_THREADS=1 nice .venv/bin/python benchmarks/detector_eval.py
    OMP_NUM_THREADS=1 nice .venv/bin/python benchmarks/detector_eval.py --skip-honest \
        --skip-attacks --skip-overhead --history --out benchmarks/out/detector_history.json
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import statistics
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from miface_att import DATA, OUT, judge_for, summarise, target
from mlinvert.attacks import AttackResult
from mlinvert.attacks.presets import build_attack, preset_for, search_space
from mlinvert.data import load
from mlinvert.data.base import ImageDataset
from mlinvert.defenses import Predictor, parse_policy
from mlinvert.defenses.detector import DetectorConfig, QueryDetector, RedisHistory, fingerprints
from mlinvert.errors import DataError
from mlinvert.evaluation.faces import FaceJudge
from mlinvert.oracle import LocalOracle, Oracle
from mlinvert.oracle.wrappers import Blinded

log = logging.getLogger("detector_eval")
BATCH = 64  # honest clients send batches of this size
NEVER = 10**9  # an ``after`` no stream reaches: the detector only counts
ATTACKS = (("black-box", "blackbox", "full"), ("black-box", "blackbox", "round:2"))
LABEL_ONLY = ("label-only", "label-only", "full")
ACCOUNT = "attacker"
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}


class Counted:
    """The detector under test plus a twin that never flags, so the total count of near
    duplicates survives the reset the real one does when it flags."""

    def __init__(self, config: DetectorConfig) -> None:
        self.detector = QueryDetector(config)
        self.counter = QueryDetector(replace(config, action="flag", after=NEVER))

    @property
    def guards(self) -> list[QueryDetector]:
        """Both detectors, the one under test first (a block stops the batch there)."""
        return [self.detector, self.counter]

    def report(self, account: str) -> dict[str, Any]:
        """Inputs, near duplicates, and the flag (inputs sent by then) of ``account``."""
        status = self.counter.status(account)
        flag = self.detector.flags.flagged(account)
        return {
            "inputs": status["inputs"],
            "near_duplicates": status["near_duplicates"],
            "near_share": status["near_duplicates"] / max(status["inputs"], 1),
            "flagged": flag is not None,
            "flagged_at_input": None if flag is None else flag.inputs,
        }


# ------------------------------------------------------------------ 1. honest traffic
def shift(img: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """``img`` moved by (dy, dx) pixels, the uncovered border repeating the edge."""
    h, w = img.shape
    pad = np.pad(img, 2, mode="edge")
    return pad[2 - dy : 2 - dy + h, 2 - dx : 2 - dx + w]


def recapture(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Each photo as a second camera shot would give it: brightness +-0.05, contrast
    x0.9-1.1, Gaussian noise sigma 0.02, a shift of up to 2 px each way."""
    out = np.empty_like(images)
    for i, img in enumerate(images):
        dy, dx = (int(v) for v in rng.integers(-2, 3, size=2))
        mean = float(img.mean())
        jittered = (img - mean) * rng.uniform(0.9, 1.1) + mean + rng.uniform(-0.05, 0.05)
        jittered = jittered + rng.normal(0.0, 0.02, size=img.shape)
        out[i] = np.clip(shift(jittered, dy, dx), 0.0, 1.0)
    return out


def image_set(spec: str) -> ImageDataset:
    """``load(spec)`` known to be an image data set."""
    ds = load(spec, seed=0)
    if not isinstance(ds, ImageDataset):
        raise DataError(f"expected images from {spec!r}, got {type(ds).__name__}")
    return ds


def jpeg(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Each photo JPEG-encoded and decoded again at a random quality in 70..95."""
    out = np.empty_like(images)
    for i, img in enumerate(images):
        buf = io.BytesIO()
        pixels = Image.fromarray((img * 255).round().astype(np.uint8))
        pixels.save(buf, "JPEG", quality=int(rng.integers(70, 96)))
        out[i] = np.asarray(Image.open(buf), dtype=np.float32) / 255
    return out


def honest_streams(ds: ImageDataset) -> Iterator[tuple[str, np.ndarray]]:
    """(name, inputs) of every honest stream, in the order they are sent."""
    from skimage.data import lfw_subset

    rng = np.random.default_rng(0)
    att = ds.images[rng.permutation(len(ds.images))]
    yield f"AT&T photos, all {len(att)}, shuffled", att
    passes = [recapture(att[rng.permutation(len(att))], rng) for _ in range(10)]
    yield f"AT&T photos re-captured, 10 passes ({10 * len(att)})", np.concatenate(passes)
    one = np.repeat(att[:1], 150, axis=0)
    yield "one photo sent 150 times unchanged (a retry loop)", one
    yield "one photo sent 150 times, each a new JPEG (quality 70-95)", jpeg(one, rng)
    yield "one photo re-captured 150 times in a row", recapture(one, rng)
    lfw = lfw_subset().astype(np.float32)
    yield "scikit-image LFW subset: 100 faces (25x25)", lfw[:100]
    yield "scikit-image LFW subset: 100 non-faces (25x25)", lfw[100:]
    digits = image_set("digits").images
    yield f"digits (8x8), all {len(digits)}", digits


def honest(ds: ImageDataset, config: DetectorConfig) -> list[dict[str, Any]]:
    """Feed each honest stream to a fresh detector in batches of 64."""
    rows = []
    for name, x in honest_streams(ds):
        det = Counted(config)
        for t, i in enumerate(range(0, len(x), BATCH)):
            for guard in det.guards:
                guard.check("honest", x[i : i + BATCH], float(t))
        rows.append({"stream": name, **det.report("honest")})
        log.info("honest %s: %s", name, rows[-1])
    return rows


# ------------------------------------------------------------------ 2. attacks
class Scene:
    """Data set, preset, cached spaces and models shared by every attack run."""

    def __init__(self, ds: ImageDataset, people: int) -> None:
        self.ds = ds
        self.preset = preset_for(ds.image_shape, quick=False)
        self.labels = list(range(people))
        self.spaces: dict[int, Any] = {}
        self.models: dict[str, Any] = {}

    def model(self, kind: str) -> Any:
        """The cached trained target of ``kind`` (benchmarks/out/models/KIND)."""
        if kind not in self.models:
            self.models[kind] = target(self.ds, kind)[0]
        return self.models[kind]

    def space(self, label: int) -> Any:
        """The audit's search space for ``label`` (bound once, reused by every run)."""
        if label not in self.spaces:
            p = self.preset
            self.spaces[label] = search_space(self.ds, label, p.space, augment=p.augment)
        return self.spaces[label]

    def campaign(
        self,
        kind: str,
        attack: str,
        policy: str,
        config: DetectorConfig,
        wrap: Callable[[Oracle], Oracle] = lambda o: o,
    ) -> tuple[list[AttackResult], dict[str, Any]]:
        """One account attacks every person in turn; the results and the detector's view."""
        det = Counted(config)
        predictor = Predictor(
            self.model(kind), name=kind, policy=parse_policy(policy), guards=det.guards
        )
        base = LocalOracle(predictor, account=ACCOUNT)
        oracle = wrap(base)
        results, ends = [], []
        t0 = time.perf_counter()
        for label in self.labels:
            p = self.preset
            attack_ = build_attack(attack, p, p.budget, self.space(label), policy=policy)
            results.append(attack_.run(oracle, label, seed=0, budget=p.budget))
            ends.append(base.n_queries)
            log.info(
                "%s %s %s %s person %d: %s, %d queries in total",
                kind,
                attack,
                policy,
                config.name,
                label,
                results[-1].status,
                base.n_queries,
            )
        view = det.report(ACCOUNT)
        at = view["flagged_at_input"]
        view.update(
            queries=base.n_queries,
            seconds=time.perf_counter() - t0,
            statuses=[r.status for r in results],
            finished=sum(r.status in ("succeeded", "budget_exhausted") for r in results),
            # the person under attack when the flag went up (the input count is batch-exact)
            flagged_during_person=None if at is None else sum(e < at for e in ends),
        )
        return results, view


Plain = dict[tuple[str, str], dict[str, Any]]


def attacks(
    scene: Scene, kinds: list[str], config: DetectorConfig, judge: FaceJudge
) -> tuple[list[dict[str, Any]], Plain]:
    """Every attack row in flag mode, then again in block mode; the black-box attacks'
    detector view and judged result kept per (model, policy) for the blinding table."""
    rows, kept = [], {}
    for kind in kinds:
        for name, attack, policy in (*ATTACKS, LABEL_ONLY):
            flagged, view = scene.campaign(kind, attack, policy, config)
            _, blocked = scene.campaign(kind, attack, policy, replace(config, action="block"))
            row = {"model": kind, "attack": name, "policy": policy, "flag": view}
            row["block"] = {
                k: blocked[k] for k in ("finished", "queries", "statuses", "flagged_at_input")
            }
            if attack == "blackbox":
                row["judged"] = summarise(judge, AttackResult.merge(flagged))
                kept[(kind, policy)] = {"flag": view, "judged": row["judged"]}
            rows.append(row)
    return rows, kept


def blinding(
    scene: Scene,
    kinds: list[str],
    amplitudes: list[float],
    config: DetectorConfig,
    judge: FaceJudge,
    plain: Plain,
    policies: list[str],
) -> list[dict[str, Any]]:
    """The black-box attack under each policy with every probe blinded, beside the same
    attack without blinding (amplitude 0, from the attack table)."""
    rows = []
    for kind in kinds:
        for policy in policies:
            rows.append(
                {"model": kind, "policy": policy, "amplitude": 0.0, **plain[(kind, policy)]}
            )
            for a in amplitudes:

                def wrap(o: Oracle, a: float = a) -> Oracle:
                    return Blinded(o, a, seed=0)

                results, view = scene.campaign(kind, "blackbox", policy, config, wrap)
                judged = summarise(judge, AttackResult.merge(results))
                rows.append(
                    {
                        "model": kind,
                        "policy": policy,
                        "amplitude": a,
                        "flag": view,
                        "judged": judged,
                    }
                )
    return rows


# ------------------------------------------------------------------ 4. overhead
def overhead(ds: ImageDataset, scene: Scene, config: DetectorConfig, repeats: int) -> dict:
    """Inputs per second through ``Predictor.predict`` without the detector, with it on a
    fresh account (empty history) and with it on an account whose history is full
    (``history`` earlier re-captured photos), alternating; the microseconds of
    ``fingerprints`` per input; and the memory one full account holds."""
    model = scene.model("softmax")
    photos = ds.images[np.random.default_rng(0).permutation(len(ds.images))]
    passes = -(-config.history // len(photos)) + 1  # past the history: forgetting runs too
    stream = np.concatenate([recapture(photos, np.random.default_rng(r)) for r in range(passes)])
    full = QueryDetector(config)
    tracemalloc.start()
    for t, i in enumerate(range(0, len(stream), BATCH)):
        full.check("full", stream[i : i + BATCH], float(t))
    held, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    out: dict[str, Any] = {
        "repeats": repeats,
        "history_inputs": len(stream),
        "memory_mb_per_full_account": held / 2**20,
    }
    for batch in (1, 64):
        n = 200 if batch == 1 else 384  # distinct photos, batch 64: six calls
        speeds: dict[str, list[float]] = {"without": [], "fresh": [], "full": []}
        for r in range(repeats):
            for mode in speeds:
                guards = {"without": [], "fresh": [QueryDetector(config)], "full": [full]}[mode]
                account = "full" if mode == "full" else f"bench-{r}"
                predictor = Predictor(model, name="softmax", guards=guards)
                t0 = time.perf_counter()
                for i in range(0, n, batch):
                    predictor.predict(photos[i : i + batch], account=account)
                speeds[mode].append(n / (time.perf_counter() - t0))
        prints = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            for i in range(0, n, batch):
                fingerprints(photos[i : i + batch], config)
            prints.append((time.perf_counter() - t0) / n * 1e6)
        median = {mode: statistics.median(v) for mode, v in speeds.items()}
        out[f"batch_{batch}"] = {
            "inputs_per_s_without": median["without"],
            "inputs_per_s_fresh_account": median["fresh"],
            "inputs_per_s_full_history": median["full"],
            "ratio_fresh": median["fresh"] / median["without"],
            "ratio_full": median["full"] / median["without"],
            "fingerprint_us_per_input": statistics.median(prints),
        }
    return out


# ------------------------------------------------------------------ 5. shared history
def nes_stream(ds: ImageDataset, batches: int, seed: int = 0) -> list[np.ndarray]:
    """A black-box attacker's batches: NES with 100 antithetic pairs (201 probes: the
    current image and ``z +- 0.01 u``, u ~ N(0, I) per pixel) around an image that moves
    by a small random step between batches (as gradient ascent moves it)."""
    rng = np.random.default_rng(seed)
    z = ds.images[0].astype(np.float32)
    out = []
    for _ in range(batches):
        u = rng.standard_normal((100, *z.shape)).astype(np.float32) * np.float32(0.01)
        out.append(np.clip(np.concatenate([z[None], z + u, z - u]), 0, 1).astype(np.float32))
        z = np.clip(z + rng.normal(0, 0.01, z.shape), 0, 1).astype(np.float32)
    return out


def honest_batches(ds: ImageDataset, inputs: int) -> list[np.ndarray]:
    """Distinct photos (re-captured AT&T photos, as the overhead section), batches of 64."""
    photos = ds.images
    passes = -(-inputs // len(photos))
    stream = np.concatenate([recapture(photos, np.random.default_rng(r)) for r in range(passes)])[
        :inputs
    ]
    return [stream[i : i + BATCH] for i in range(0, len(stream), BATCH)]


def redis_account_memory(client: Any, history: RedisHistory, config: DetectorConfig) -> dict:
    """MEMORY USAGE summed over one account's keys, and how its buckets are encoded."""
    counters, ring, buckets = history.keys(ACCOUNT, config)
    bucket_keys = list(client.scan_iter(match=buckets + "*", count=1000))
    usage = {
        "counters": client.memory_usage(counters, samples=0) or 0,
        "ring": client.memory_usage(ring, samples=0) or 0,
        "buckets": sum(client.memory_usage(k, samples=0) or 0 for k in bucket_keys),
    }
    encodings: dict[str, int] = {}
    for k in bucket_keys:
        enc = client.object("encoding", k).decode()
        encodings[enc] = encodings.get(enc, 0) + 1
    return {
        "bytes": usage,
        "total_mb": sum(usage.values()) / 2**20,
        "bucket_keys": len(bucket_keys),
        "remembered_hashes": sum(client.hlen(k) for k in bucket_keys),
        "encodings": encodings,
    }


def shared_history(ds: ImageDataset, config: DetectorConfig, nes: int) -> dict:
    """Memory vs Redis history, side by side on the same batches: identical decisions,
    ``check`` time per batch in process, inputs/s through two real services, and the
    memory one account holds after 10 000 inputs (Redis MEMORY USAGE, tracemalloc)."""
    import redis

    from mlinvert.oracle import HttpOracle
    from mlinvert.service import Store
    from mlinvert.service.runner import RedisServer, ServiceProcess

    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
    counting = replace(config, action="flag", after=NEVER)
    attack = nes_stream(ds, nes)
    out: dict[str, Any] = {"nes_batches": nes, "probes_per_batch": len(attack[0])}
    late = slice(len(attack) // 2, None)  # the attack's lists are full by then
    with RedisServer() as server, tempfile.TemporaryDirectory() as tmp:
        client = redis.Redis.from_url(server.url)
        # 1. in process: the same batches to both, alternating; decisions compared; the
        # script's own time in Redis (one thread, shared by every service process)
        out["in_process"] = {}
        streams = {
            "NES attack": (attack, late),
            "distinct photos": (honest_batches(ds, 1920), None),
        }
        for label, (batches, part) in streams.items():
            memory = QueryDetector(counting)
            shared = QueryDetector(counting, history=RedisHistory(server.url, prefix="bench:"))
            times: dict[str, list[float]] = {"memory": [], "redis": []}
            identical = True
            client.config_resetstat()
            for t, batch in enumerate(batches):
                if part is not None and t == part.start:
                    client.config_resetstat()  # the script's time over the timed batches
                for name, det in (("memory", memory), ("redis", shared)):
                    t0 = time.perf_counter()
                    det.check(label, batch, float(t))
                    times[name].append(time.perf_counter() - t0)
                identical &= memory.status(label) == shared.status(label)
            script = client.info("commandstats")["cmdstat_evalsha"]
            chosen = {k: v[part] if part else v for k, v in times.items()}
            out["in_process"][label] = {
                "batch": len(batches[0]),
                "batches_timed": len(chosen["memory"]),
                "identical_decisions": identical,
                "near_duplicates": memory.status(label)["near_duplicates"],
                "inputs": memory.status(label)["inputs"],
                "redis_script_ms_per_batch": script["usec_per_call"] / 1000,
                **{f"{k}_ms_per_batch": 1000 * statistics.median(v) for k, v in chosen.items()},
                **{
                    f"{k}_inputs_per_s": len(batches[0]) / statistics.median(v)
                    for k, v in chosen.items()
                },
            }
        fp_times = []
        for batch in attack[:5]:
            t0 = time.perf_counter()
            fingerprints(batch, config)
            fp_times.append(time.perf_counter() - t0)
        out["fingerprints_ms_per_nes_batch"] = 1000 * statistics.median(fp_times)
        # 2. over HTTP: one service per history (and one without detector), same batches
        _, folder = target(ds, "softmax")
        db = Path(tmp) / "service.db"
        key, _ = Store(db).create_key(ACCOUNT)
        spec = f"detect:flag:{NEVER}"
        services = {
            "none": ServiceProcess([f"att={folder}"], db=db, max_batch=256, env=ONE_THREAD),
            "memory": ServiceProcess(
                [f"att={folder}"], db=db, detector=spec, max_batch=256, env=ONE_THREAD
            ),
            "redis": ServiceProcess(
                [f"att={folder}"],
                db=db,
                detector=spec,
                redis_url=server.url,
                max_batch=256,
                env=ONE_THREAD,
            ),
        }
        client.flushall()
        http: dict[str, list[float]] = {name: [] for name in services}
        with ExitStack() as stack:
            oracles = {}
            for name, service in services.items():
                stack.enter_context(service)
                oracles[name] = stack.enter_context(HttpOracle(service.model_url("att"), key))
            for batch in attack:
                for name, oracle in oracles.items():
                    t0 = time.perf_counter()
                    oracle.query(batch)
                    http[name].append(time.perf_counter() - t0)
        out["http"] = {
            name: {
                "inputs_per_s_second_half": len(attack[0]) / statistics.median(v[late]),
                "p50_ms_second_half": 1000 * statistics.median(v[late]),
                "p99_ms_all": 1000 * float(np.percentile(v, 99)),
            }
            for name, v in http.items()
        }
        # 3. memory per account after 10 000 inputs of each kind
        stores = {
            "NES attack": nes_stream(ds, 10_000 // len(attack[0]) + 1, seed=1),
            "distinct photos": honest_batches(ds, 10_000),
        }
        out["memory"] = {}
        for label, batches in stores.items():
            client.flushall()
            before = client.info("memory")["used_memory"]
            history = RedisHistory(server.url, prefix="mem:")
            det = QueryDetector(counting, history=history)
            tracemalloc.start()
            local = QueryDetector(counting)
            for t, batch in enumerate(batches):
                det.check(ACCOUNT, batch, float(t))
                local.check(ACCOUNT, batch, float(t))
            held, _ = tracemalloc.get_traced_memory()
            tracemalloc.stop()
            view = redis_account_memory(client, history, counting)
            view.update(
                inputs=det.status(ACCOUNT)["inputs"],
                same_counts=det.status(ACCOUNT) == local.status(ACCOUNT),
                used_memory_delta_mb=(client.info("memory")["used_memory"] - before) / 2**20,
                python_memory_mb=held / 2**20,
            )
            out["memory"][label] = view
    return out


# ------------------------------------------------------------------ tables
def yes(flag: bool) -> str:
    """Flag as a table cell."""
    return "**yes**" if flag else "no"


def pct(v: float | None) -> str:
    """A share as a percentage cell."""
    return "-" if v is None else f"{100 * v:.0f} %"


def print_tables(doc: dict[str, Any]) -> None:
    """Markdown tables of every section present in ``doc``."""
    if doc.get("honest"):
        print("\n### Honest traffic (one account per stream, batches of 64)\n")
        print("| stream | inputs | near duplicates | flagged (at input) |")
        print("|---|---|---|---|")
    for r in doc.get("honest", []):
        at = f" (at {r['flagged_at_input']})" if r["flagged"] else ""
        print(
            f"| {r['stream']} | {r['inputs']} | {r['near_duplicates']} "
            f"({pct(r['near_share'])}) | {yes(r['flagged'])}{at} |"
        )
    if doc.get("attacks"):
        print(f"\n### Attacks (one account, people 0-{doc['people'] - 1} in turn)\n")
        print(
            "| model | attack | policy | inputs | near duplicates | flag mode: flagged at input "
            "(person) | block mode: people finished / queries | eval top-1 / likeness |"
        )
        print("|---|---|---|---|---|---|---|---|")
        for r in doc["attacks"]:
            f, b = r["flag"], r["block"]
            at = (
                f"{f['flagged_at_input']} (person {f['flagged_during_person']})"
                if f["flagged"]
                else "not flagged"
            )
            j = r.get("judged")
            q = "-" if j is None else f"{pct(j['eval_top1'])} / {j['likeness']:.2f}"
            print(
                f"| {r['model']} | {r['attack']} | {r['policy']} | {f['inputs']} | "
                f"{pct(f['near_share'])} | {at} | {b['finished']} of {doc['people']} / "
                f"{b['queries']} | {q} |"
            )
    if doc.get("blinding"):
        print("\n### Query blinding (black-box attack, uniform noise +-a on every probe)\n")
        print(
            "| model | policy | a | near duplicates | flagged (at input) | eval top-1 | likeness |"
        )
        print("|---|---|---|---|---|---|---|")
        for r in doc["blinding"]:
            f = r["flag"]
            at = f" ({f['flagged_at_input']})" if f["flagged"] else ""
            j = r["judged"]
            print(
                f"| {r['model']} | {r['policy']} | {r['amplitude']:g} | {pct(f['near_share'])} | "
                f"{yes(f['flagged'])}{at} | "
                f"{pct(j['eval_top1'])} | {j['likeness']:.2f} |"
            )
    if doc.get("overhead"):
        o = doc["overhead"]
        print(f"\n### Overhead (AT&T softmax, in process, median of {o['repeats']})\n")
        print(
            "| batch | inputs/s without | with, fresh account (ratio) | with, full history "
            "(ratio) | fingerprints alone, us/input |"
        )
        print("|---|---|---|---|---|")
        for batch in (1, 64):
            b = o[f"batch_{batch}"]
            print(
                f"| {batch} | {b['inputs_per_s_without']:.0f} | "
                f"{b['inputs_per_s_fresh_account']:.0f} ({b['ratio_fresh']:.2f}) | "
                f"{b['inputs_per_s_full_history']:.0f} ({b['ratio_full']:.2f}) | "
                f"{b['fingerprint_us_per_input']:.0f} |"
            )
        print(
            f"\nDetector memory held for one account after {o['history_inputs']} inputs "
            f"(history {doc['config']['history']}): {o['memory_mb_per_full_account']:.1f} MB"
        )
    if doc.get("shared_history"):
        print_history(doc["shared_history"])
    spent = ", ".join(f"{k} {v:.0f}" for k, v in doc["durations"].items())
    print(f"\nSeconds per section: {spent}")


def print_history(h: dict[str, Any]) -> None:
    """Markdown tables of section 5 (memory vs Redis history)."""
    print(
        f"\n### Memory vs Redis history ({h['nes_batches']} NES batches of "
        f"{h['probes_per_batch']} probes, 112x92, the same batches to both; fingerprints "
        f"alone {h['fingerprints_ms_per_nes_batch']:.0f} ms per NES batch)\n"
    )
    print(
        "| path | stream | history | ms per batch (median) | inputs/s | Redis script ms "
        "per batch (mean, same batches) | identical decisions (near duplicates / inputs) |"
    )
    print("|---|---|---|---:|---:|---:|---|")
    for label, p in h["in_process"].items():
        which = "2nd half" if label == "NES attack" else "all"
        for name in ("memory", "redis"):
            script = f"{p['redis_script_ms_per_batch']:.0f}" if name == "redis" else "-"
            print(
                f"| in process, QueryDetector.check | {label}, batch {p['batch']} ({which}) "
                f"| {name} | {p[f'{name}_ms_per_batch']:.0f} | {p[f'{name}_inputs_per_s']:.0f} "
                f"| {script} | {yes(p['identical_decisions'])} ({p['near_duplicates']} / "
                f"{p['inputs']}) |"
            )
    for name, r in h["http"].items():
        label = "no detector" if name == "none" else name
        print(
            f"| HTTP raw binary, one client, softmax | NES attack, batch "
            f"{h['probes_per_batch']} (2nd half) | {label} | {r['p50_ms_second_half']:.0f} "
            f"(p99 {r['p99_ms_all']:.0f}) | {r['inputs_per_s_second_half']:.0f} | - | - |"
        )
    print(
        "\n| stream (one account) | inputs | Redis MB (MEMORY USAGE: buckets + ring + counters) "
        "| bucket keys (encodings) | remembered hashes | used_memory delta MB "
        "| memory history MB (tracemalloc) | same counts |"
    )
    print("|---|---:|---|---|---:|---:|---:|---|")
    for label, m in h["memory"].items():
        b = m["bytes"]
        enc = ", ".join(f"{k} {v}" for k, v in sorted(m["encodings"].items()))
        print(
            f"| {label} | {m['inputs']} | {m['total_mb']:.1f} ({b['buckets'] / 2**20:.1f} + "
            f"{b['ring'] / 2**20:.1f} + {b['counters'] / 2**20:.3f}) | {m['bucket_keys']} "
            f"({enc}) | {m['remembered_hashes']} | {m['used_memory_delta_mb']:.1f} | "
            f"{m['python_memory_mb']:.1f} | {yes(m['same_counts'])} |"
        )


def timed(durations: dict[str, float], name: str, fn: Callable[[], Any]) -> Any:
    """Run ``fn`` and record its wall-clock seconds under ``name``."""
    t0 = time.perf_counter()
    value = fn()
    durations[name] = time.perf_counter() - t0
    return value


def floats(text: str) -> list[float]:
    """A comma-separated list of numbers."""
    return [float(v) for v in text.split(",") if v.strip()]


def names(text: str) -> list[str]:
    """A comma-separated list of names."""
    return [v.strip() for v in text.split(",") if v.strip()]


def main(argv: Iterable[str] | None = None) -> int:
    """Run the sections asked for; print tables, write benchmarks/out/detector_eval.json."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--people", type=int, default=5, help="people attacked in turn")
    ap.add_argument("--models", type=names, default=["softmax", "mlp"])
    ap.add_argument("--amplitudes", type=floats, default=[0.01, 0.02, 0.05, 0.1, 0.2])
    ap.add_argument("--blinding-policies", type=names, default=["full", "round:2"])
    ap.add_argument("--repeats", type=int, default=5, help="overhead repeats")
    ap.add_argument("--skip-honest", action="store_true")
    ap.add_argument("--skip-attacks", action="store_true", help="also skips blinding")
    ap.add_argument("--skip-blinding", action="store_true")
    ap.add_argument("--skip-overhead", action="store_true")
    ap.add_argument(
        "--history",
        action="store_true",
        help="also run section 5, memory vs Redis history (needs redis-server)",
    )
    ap.add_argument("--nes-batches", type=int, default=30, help="section 5's attack batches")
    ap.add_argument("--out", default=str(OUT / "detector_eval.json"))
    args = ap.parse_args(list(argv) if argv is not None else None)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if not (DATA / "s1").is_dir():
        print(
            f"AT&T faces not found at {DATA} (expected folders s1..s40); nothing measured",
            file=sys.stderr,
        )
        return 2
    ds = image_set(f"att:{DATA}")
    config = DetectorConfig()
    durations: dict[str, float] = {}
    doc: dict[str, Any] = {
        "command": " ".join(["benchmarks/detector_eval.py", *sys.argv[1:]]),
        "config": {k: getattr(config, k) for k in config.__dataclass_fields__},
        "people": args.people,
        "durations": durations,
    }
    scene = Scene(ds, args.people)
    if not args.skip_honest:
        doc["honest"] = timed(durations, "honest", lambda: honest(ds, config))
    if not args.skip_attacks:
        judge = timed(durations, "judge", lambda: judge_for(ds))
        rows, plain = timed(
            durations, "attacks", lambda: attacks(scene, args.models, config, judge)
        )
        doc["attacks"] = rows
        if not args.skip_blinding:
            doc["blinding"] = timed(
                durations,
                "blinding",
                lambda: blinding(
                    scene,
                    args.models,
                    args.amplitudes,
                    config,
                    judge,
                    plain,
                    args.blinding_policies,
                ),
            )
    if not args.skip_overhead:
        doc["overhead"] = timed(
            durations, "overhead", lambda: overhead(ds, scene, config, args.repeats)
        )
    if args.history:
        doc["shared_history"] = timed(
            durations, "history", lambda: shared_history(ds, config, args.nes_batches)
        )
    durations["total"] = sum(durations.values())
    print_tables(doc)
    OUT.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(doc, fh, indent=2)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
