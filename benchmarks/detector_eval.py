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
   ``fingerprints`` alone.

    OMP_NUM_THREADS=1 nice .venv/bin/python benchmarks/detector_eval.py
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import statistics
import sys
import time
import tracemalloc
from collections.abc import Callable, Iterable, Iterator
from dataclasses import replace
from typing import Any

import numpy as np
from PIL import Image

from miface_att import DATA, OUT, judge_for, summarise, target
from mlinvert.attacks import AttackResult
from mlinvert.data import load
from mlinvert.data.base import ImageDataset
from mlinvert.defenses import Predictor, parse_policy
from mlinvert.defenses.detector import DetectorConfig, QueryDetector, fingerprints
from mlinvert.errors import DataError
from mlinvert.evaluation.audit import build_attack, preset_for, search_space
from mlinvert.evaluation.faces import FaceJudge
from mlinvert.oracle import LocalOracle, Oracle
from mlinvert.oracle.wrappers import Blinded

log = logging.getLogger("detector_eval")
BATCH = 64  # honest clients send batches of this size
NEVER = 10**9  # an ``after`` no stream reaches: the detector only counts
ATTACKS = (("black-box", "blackbox", "full"), ("black-box", "blackbox", "round:2"))
LABEL_ONLY = ("label-only", "label-only", "full")
ACCOUNT = "attacker"


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
    spent = ", ".join(f"{k} {v:.0f}" for k, v in doc["durations"].items())
    print(f"\nSeconds per section: {spent}")


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
    durations["total"] = sum(durations.values())
    print_tables(doc)
    OUT.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(doc, fh, indent=2)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
