"""Synthetic audit results (records + images) and a headless-Chromium page checker."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

DEFENSES = ("none", "round:1", "labels", "rate:300/hour")
ATTACKS = ("whitebox", "blackbox", "label-only")


def _png(path: Path, img: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8)).save(path)


def _face(label: int, rng: np.random.Generator) -> np.ndarray:
    """A blob 'face' whose position depends on the label."""
    yy, xx = np.mgrid[0:24, 0:20]
    cy, cx = 8 + label % 3 * 4, 6 + label % 4 * 3
    return np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 30.0) + 0.05 * rng.random((24, 20))


def make_results(
    out: Path, *, n_labels: int = 4, status: str = "complete", faces: bool = False
) -> dict[str, Any]:
    """Write a synthetic but schema-complete audit run into ``out``; return the document.

    ``faces``: judged by the independent face recogniser, as an audit of face data is:
    the strong reconstructions are ranked first except for person 0, the others last.
    """
    rng = np.random.default_rng(0)
    records = []
    private = {}
    held = {}
    utility: dict[str, dict[str, Any]] = {}
    for target in ("softmax", "mlp"):
        utility[target] = {}
        for d in DEFENSES:
            utility[target][d] = {
                "accuracy": 0.95,
                "ece": {"none": 0.03, "round:1": 0.06, "labels": 0.05}.get(d, 0.03),
                "topk_accuracy": {"labels": 0.95, "round:1": 0.97}.get(d, 0.99),
                "brier": {"labels": 0.1, "round:1": 0.09}.get(d, 0.07),
                "k": 3,
                "carries": "label" if d == "labels" else "probs",
                "rate_limit": "300/hour" if d.startswith("rate") else None,
                "n_test": 120,
            }
        for label in range(n_labels):
            face = _face(label, rng)
            private[str(label)] = f"images/private/{label}.png"
            _png(out / private[str(label)], face)
            held[str(label)] = f"images/held_out/{label}.png"
            _png(out / held[str(label)], face)
            for attack in ATTACKS:
                for d in DEFENSES:
                    strong = attack == "whitebox" or d in ("none", "rate:300/hour")
                    img = face if strong else rng.random(face.shape)
                    slug = d.replace(":", "_").replace("/", "_")
                    rel = f"images/{target}/{attack}/{slug}/{label}.png"
                    _png(out / rel, img)
                    ok = strong and label != 0
                    judged = (
                        {
                            "face_found": strong,
                            "judge_rank": 1 if ok else n_labels,
                            "judge_top1": ok,
                            "judge_top5": ok,
                            "judge_lineup5": 1.0 if ok else 0.0,
                            "judge_distance": 0.4 if ok else 0.8,
                            "judge_same_person": ok,
                            "measured": True,
                        }
                        if faces
                        else {}
                    )
                    records.append(
                        {
                            **judged,
                            "attack": attack,
                            "defense": d,
                            "target_model": target,
                            "label": label,
                            "label_name": f"s{label + 1}",
                            "n_queries": 100 if attack == "whitebox" else 5000,
                            "seconds": 0.5,
                            "status": "rate_limited"
                            if d.startswith("rate") and attack != "whitebox"
                            else "succeeded",
                            "error": None,
                            "eval_top1": ok,
                            "eval_top5": strong,
                            "likeness": 0.8 if strong else 0.1,
                            "lineup_correct": ok,
                            "pixel_nn_correct": ok,
                            "ssim": 0.6 if strong else 0.05,
                            "mse": 0.01,
                            "feature_distance": 0.4 if strong else 1.3,
                            "eigen_nn_correct": ok,
                            "target_confidence": 0.99 if strong else 0.2,
                            "recovered": ok,
                            "image": rel,
                            "seed": 7,
                            "utility": utility[target][d],
                        }
                    )
    refs = []
    for name in ("grey", "uniform noise", "noise template", "held-out photo"):
        rel = f"images/references/{name.replace(' ', '_')}.png"
        _png(out / rel, rng.random((24, 20)))
        refs.append(
            {
                "name": name,
                "label": 1,
                "eval_top1": name != "grey",
                "eval_top5": True,
                "likeness": 0.9 if name == "held-out photo" else 0.1,
                "lineup_correct": name == "held-out photo",
                "pixel_nn_correct": False,
                "ssim": 0.1,
                "feature_distance": 1.0,
                "recovered": name == "held-out photo",
                "image": rel,
            }
        )
    doc = {
        "schema": "mlinvert-audit/1",
        "status": status,
        "started": "2026-01-01T00:00:00Z",
        "updated": "2026-01-01T00:05:00Z",
        "command": "mlinvert audit --out runs/x",
        "seed": 7,
        "versions": {"mlinvert": "0.1.0", "python": "3.11"},
        "config": {"data": "synthetic", "seed": 7},
        "dataset": {
            "spec": "synthetic",
            "n_classes": n_labels,
            "class_names": [f"s{i + 1}" for i in range(n_labels)],
        },
        "thresholds": {
            "likeness": 0.5,
            "exposed_rate": 0.2,
            "identity_rate": 0.3,
            "max_accuracy_cost": 0.01,
            **(
                {"judge": "independent", "judge_name": "dlib (test)", "identity_lineup": 0.5}
                if faces
                else {}
            ),
        },
        "targets": {
            "softmax": {"kind": "softmax", "test_accuracy": 0.95},
            "mlp": {"kind": "mlp", "test_accuracy": 0.95},
        },
        "defenses": [{"name": d} for d in DEFENSES],
        "utility": utility,
        "private_images": private,
        "held_out_images": held,
        "references": refs,
        "records": records,
        "tree_audit": None,
    }
    (out / "results.json").write_text(json.dumps(doc))
    return doc


@dataclass(frozen=True)
class PageCheck:
    """What headless Chromium saw after loading a page."""

    ready: bool
    images_total: int
    images_broken: int
    errors: int
    stderr: str
    viewport_height: int = -1
    faces_bottom: int = -1  # bottom of the first faces grid, in page pixels
    first_table_top: int = -1  # top of the first table that is not a faces grid


def chromium_binary() -> str:
    """Path of Debian's chromium, or skip the test with the reason."""
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    pytest.skip("chromium is not installed (Debian package `chromium`; `make system-deps`)")


def _flags(tmp: Path) -> list[str]:
    return [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        f"--user-data-dir={tmp}",
        "--virtual-time-budget=10000",
    ]


def check_page(
    html: Path, tmp: Path, *, screenshot: Path | None = None, window: str = "1280,900"
) -> PageCheck:
    """Load ``html`` from disk in headless Chromium in a ``window`` (width,height) screen;
    read the page's self-check attributes."""
    exe = chromium_binary()
    url = html.resolve().as_uri()
    proc = subprocess.run(
        [
            exe,
            *_flags(tmp / "profile-dom"),
            f"--window-size={window}",
            "--enable-logging=stderr",
            "--v=0",
            "--dump-dom",
            url,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    body = re.search(r"<body([^>]*)>", proc.stdout)
    attrs = dict(re.findall(r'data-([a-z-]+)="([^"]*)"', body.group(1))) if body else {}
    if screenshot is not None:
        subprocess.run(
            [
                exe,
                *_flags(tmp / "profile-shot"),
                f"--screenshot={screenshot}",
                "--window-size=1280,2400",
                "--hide-scrollbars",
                url,
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    return PageCheck(
        ready=attrs.get("report-ready") == "1",
        images_total=int(attrs.get("images-total", -1)),
        images_broken=int(attrs.get("images-broken", -1)),
        errors=int(attrs.get("errors", -1)),
        stderr=proc.stderr,
        viewport_height=int(attrs.get("viewport-height", -1)),
        faces_bottom=int(attrs.get("faces-bottom", -1)),
        first_table_top=int(attrs.get("first-table-top", -1)),
    )
