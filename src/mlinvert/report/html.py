"""Render an audit's ``results.json`` into one self-contained ``index.html``.

Every picture (plots, image grids) is embedded as a base64 ``data:`` URI, so the file
opens from disk, offline, with nothing beside it. The page carries a tiny script that
marks, on ``<body>``, how many images loaded and whether any script error fired; the
browser test reads those attributes.
"""

from __future__ import annotations

import base64
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
from jinja2 import Environment, PackageLoader, select_autoescape
from PIL import Image

from mlinvert.errors import DataError
from mlinvert.report import plots
from mlinvert.report.summary import (
    API_ATTACKS,
    LINEUP_CHANCE,
    answer,
    attack_title,
    cells,
    recommendations,
    utility_of,
    verdicts,
)

log = logging.getLogger(__name__)

#: Labels per grid block (a wider grid is split into blocks of this many people).
GRID_COLUMNS = 10

MAPPING = [
    (
        "OWASP Machine Learning Security Top 10 — ML03:2023 Model Inversion Attack",
        "https://owasp.org/www-project-machine-learning-security-top-10/docs/"
        "ML03_2023-Model_Inversion_Attack",
        "The attacker reverse-engineers private training data (faces, or a person's "
        "sensitive survey answer) from the model's predictions. Every attack in this "
        "audit is an instance.",
    ),
    (
        "MITRE ATLAS AML.T0024 — Exfiltration via ML Inference API (AML.T0024.001 Invert ML Model)",
        "https://atlas.mitre.org/techniques/AML.T0024",
        "The black-box and label-only attacks use only the served inference API, "
        "with an ordinary API key, exactly as an outside adversary would.",
    ),
]


#: Image data sets that are not faces (by the kind in ``dataset.spec``): the report's
#: words "person" and "face" then need saying what they stand for.
NOT_FACES = {"digits": "handwritten digits"}


def data_uri(png: bytes) -> str:
    """``data:image/png;base64,...`` for PNG bytes."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def read_image(path: Path) -> np.ndarray:
    """A stored PNG as float32 ``(h, w)`` in [0, 1]."""
    with Image.open(path) as im:
        return np.asarray(im.convert("L"), dtype=np.float32) / 255.0


def load_results(out_dir: Path) -> dict[str, Any]:
    """Read ``out_dir/results.json`` (DataError naming the problem if absent/broken)."""
    path = Path(out_dir) / "results.json"
    try:
        data: dict[str, Any] = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise DataError(
            f"no results.json in {out_dir}; run `mlinvert audit --out DIR` first"
        ) from exc
    except json.JSONDecodeError as exc:
        raise DataError(
            f"{path} is not valid JSON ({exc}); re-run the audit with --resume"
        ) from exc
    if not isinstance(data, dict) or "records" not in data:
        raise DataError(f"{path} is not an mlinvert audit result (no 'records' field)")
    return data


def _maybe_image(out_dir: Path, rel: str | None) -> np.ndarray | None:
    if not rel:
        return None
    path = out_dir / rel
    if not path.exists():
        log.warning("image %s referenced by results.json is missing", path)
        return None
    return read_image(path)


def _grids(results: dict[str, Any], out_dir: Path) -> list[dict[str, Any]]:
    """One grid per (target, attack) and block of people: private photo + each defence."""
    records = results.get("records", [])
    defenses = [d["name"] for d in results.get("defenses", [])] or list(
        dict.fromkeys(r["defense"] for r in records)
    )
    private = results.get("private_images", {})
    names = results.get("dataset", {}).get("class_names", [])
    index = {(r["target_model"], r["attack"], r["defense"], int(r["label"])): r for r in records}
    grids = []
    for target in dict.fromkeys(r["target_model"] for r in records):
        for attack in dict.fromkeys(r["attack"] for r in records if r["target_model"] == target):
            labels = sorted(
                {
                    int(r["label"])
                    for r in records
                    if (r["target_model"], r["attack"]) == (target, attack)
                }
            )
            for start in range(0, len(labels), GRID_COLUMNS):
                block = labels[start : start + GRID_COLUMNS]
                cols = [names[lab] if lab < len(names) else str(lab) for lab in block]
                rows: list[tuple[str, list[np.ndarray | None], list[bool]]] = [
                    (
                        "private\ntraining photo",
                        [_maybe_image(out_dir, private.get(str(lab))) for lab in block],
                        [False] * len(block),
                    )
                ]
                shown: list[str] = []
                repeats: dict[str, list[str]] = {}
                for defense in defenses:
                    recs = [index.get((target, attack, defense, lab)) for lab in block]
                    if not any(recs):
                        continue
                    origin = {r.get("shared_from") for r in recs if r}
                    if len(origin) == 1 and (source := origin.pop()) in shown:
                        # the very run of an earlier row: the same images, drawn once
                        repeats.setdefault(source, []).append(defense)
                        continue
                    shown.append(defense)
                    rows.append(
                        (
                            defense,
                            [_maybe_image(out_dir, r.get("image")) if r else None for r in recs],
                            [bool(r and r.get("recovered")) for r in recs],
                        )
                    )
                title = f"{target} — {attack_title(attack)} — people {cols[0]}…{cols[-1]}"
                grids.append(
                    {
                        "title": title,
                        "uri": data_uri(plots.image_grid(cols, rows)),
                        "alt": f"reconstructions: {title}",
                        "repeats": [
                            f"{', '.join(ds)}: the same run as '{src}' (its row)"
                            for src, ds in repeats.items()
                        ],
                    }
                )
    return grids


#: What each reference image is (``mlinvert.evaluation.references``), by its name with
#: hyphens and underscores read as spaces.
REFERENCE_NOTES = {
    "grey": "a flat grey image",
    "uniform noise": "uniform noise",
    "noise template": "noise carrying the person's discriminative template: a person sees "
    "noise, a classifier or a blurred matcher still names the person",
    "held out photo": "one of the person's own held-out photos (never used in training)",
    "private mean": "the average of the person's private training photos, which a perfect "
    "inversion of a confidence score approaches: the upper reference",
}


def _references(results: dict[str, Any], out_dir: Path) -> dict[str, Any] | None:
    refs = results.get("references") or []
    if not refs:
        return None
    rows = [
        (r["name"], [_maybe_image(out_dir, r.get("image"))], [bool(r.get("recovered"))])
        for r in refs
    ]
    png = plots.image_grid(["image"], rows)
    notes = [
        REFERENCE_NOTES.get(r["name"].replace("-", " ").replace("_", " "), r["name"]) for r in refs
    ]
    return {"uri": data_uri(png), "rows": refs, "notes": notes}


def _tree_plot(results: dict[str, Any], out_dir: Path) -> str | None:
    rel = (results.get("tree_audit") or {}).get("plot")
    if not rel or not (out_dir / rel).exists():
        return None
    return data_uri((out_dir / rel).read_bytes())


def _tables(results: dict[str, Any]) -> list[dict[str, Any]]:
    tables = []
    cs = cells(results.get("records", []))
    for target in dict.fromkeys(c.target_model for c in cs):
        for attack in dict.fromkeys(c.attack for c in cs if c.target_model == target):
            mine = [c for c in cs if (c.target_model, c.attack) == (target, attack)]
            tables.append(
                {
                    "target": target,
                    "attack": attack,
                    "title": f"{target} — {attack_title(attack)}",
                    "api": attack in API_ATTACKS,
                    "cells": mine,
                    "utility": {c.defense: utility_of(results, target, c.defense) for c in mine},
                }
            )
    return tables


def render_report(out_dir: Path | str) -> Path:
    """Render ``out_dir/results.json`` (+ its images) to ``out_dir/index.html``."""
    out_dir = Path(out_dir)
    results = load_results(out_dir)
    vs = verdicts(results)
    env = Environment(
        loader=PackageLoader("mlinvert.report", "templates"),
        autoescape=select_autoescape(["html", "j2"]),
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["pct"] = lambda x: "n/a" if x is None else f"{100 * float(x):.0f} %"
    env.filters["num"] = lambda x, d=2: "n/a" if x is None else f"{float(x):,.{d}f}"
    records = results.get("records", [])
    has_faces = bool(records)
    context = {
        "r": results,
        "verdicts": vs,
        "answer": answer(results, vs),
        "recommendations": recommendations(results, vs),
        "mapping": MAPPING,
        "lineup_chance": LINEUP_CHANCE,
        "tables": _tables(results),
        "grids": _grids(results, out_dir) if has_faces else [],
        "references": _references(results, out_dir),
        "plot_queries": data_uri(plots.accuracy_vs_queries(results)) if has_faces else None,
        "plot_utility": data_uri(plots.privacy_utility(results)) if has_faces else None,
        "not_faces": NOT_FACES.get(
            str(results.get("dataset", {}).get("spec", "")).partition(":")[0].strip().lower()
        ),
        "tree": results.get("tree_audit"),
        "tree_plot": _tree_plot(results, out_dir),
    }
    html = env.get_template("report.html.j2").render(**context)
    path = out_dir / "index.html"
    tmp = path.with_suffix(".html.tmp")
    tmp.write_text(html, encoding="utf-8")
    tmp.replace(path)
    return path
