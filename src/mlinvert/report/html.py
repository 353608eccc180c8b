"""Render an audit's ``results.json`` into one self-contained ``index.html``.

Every picture (plots, image grids) is embedded as a base64 ``data:`` URI, so the file
opens from disk, offline, with nothing beside it. The page carries a tiny script that
marks, on ``<body>``, how many images loaded and whether any script error fired; the
browser test reads those attributes.
"""

from __future__ import annotations

import base64
import io
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from jinja2 import Environment, PackageLoader, Undefined, select_autoescape
from PIL import Image

from mlinvert.core import API_ATTACKS
from mlinvert.errors import DataError
from mlinvert.evaluation.faces import NOT_FACES
from mlinvert.report import plots
from mlinvert.report.summary import (
    LINEUP_CHANCE,
    answer,
    attack_title,
    cells,
    faces_judged,
    identity_bar,
    recommendations,
    thresholds,
    utility_of,
    verdicts,
)

log = logging.getLogger(__name__)

#: People in the first screen's faces grid, spread evenly over the attacked people
#: (every person is on ``faces.html``).
SAMPLE_PEOPLE = 4
#: Width in pixels of a face in the faces grids.
THUMB_WIDTH = 46
#: A reconstruction is marked "lineup" when it wins at least this share of the 5-way
#: lineups the independent recogniser can be shown (it is more often picked than not).
LINEUP_MARK = 0.5
#: Short column heads of the attacks in the faces grid.
ATTACK_SHORT = {"whitebox": "weights", "blackbox": "scores", "label-only": "labels"}

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


def _thumb(out_dir: Path, rel: str | None) -> str | None:
    """A stored PNG shrunk to :data:`THUMB_WIDTH` pixels wide, as a data URI."""
    if not rel or not (out_dir / rel).exists():
        return None
    with Image.open(out_dir / rel) as im:
        grey = im.convert("L")
        height = max(round(grey.height * THUMB_WIDTH / grey.width), 1)
        small = grey.resize((THUMB_WIDTH, height), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    small.save(buf, format="PNG", optimize=True)
    return data_uri(buf.getvalue())


def _mark(record: dict[str, Any], faces: bool) -> str:
    """How the judge marks one reconstruction: recognised, lineup, not, unmeasured."""
    if not record.get("measured", True):
        return "unmeasured"
    if not record.get("image"):
        return "none"
    if faces:
        if record.get("judge_top1"):
            return "recognised"
        return "lineup" if (record.get("judge_lineup5") or 0.0) >= LINEUP_MARK else "not"
    return "recognised" if record.get("recovered") else "not"


def _face_cell(
    record: dict[str, Any] | None, faces: bool, image: Callable[[str | None], str | None]
) -> dict[str, Any]:
    if record is None:
        return {"src": None, "mark": "none", "title": "not run", "href": None}
    rel = record.get("image")
    mark = _mark(record, faces)
    title = f"{record['attack']} · {record['defense']} · {record.get('label_name', '')}: {mark}"
    if faces and record.get("judge_rank") is not None:
        title += (
            f" (rank {record['judge_rank']} of the people; lineup "
            f"{100 * float(record.get('judge_lineup5') or 0):.0f} %; face "
            f"{'found' if record.get('face_found') else 'not found'})"
        )
    if record.get("error") and mark in ("unmeasured", "none"):
        title += f" — {record['error']}"
    return {
        "src": image(rel),
        "mark": mark,
        "title": title,
        "href": rel,
    }


def sample_people(labels: list[int], n: int = SAMPLE_PEOPLE) -> list[int]:
    """``n`` of ``labels`` spread evenly (first, ..., towards the last), in order."""
    if len(labels) <= n:
        return list(labels)
    step = len(labels) / n
    return [labels[int(i * step)] for i in range(n)]


def faces_grid(
    results: dict[str, Any], out_dir: Path, labels: list[int] | None = None, *, inline: bool
) -> list[dict[str, Any]]:
    """Per target: each person's private and held-out photo, the white-box
    reconstruction, and each API attack's under each defence, marked by the judge.

    ``inline``: thumbnails as data URIs (the self-contained index.html), otherwise the
    stored images by relative path (faces.html beside it).
    """
    records = results.get("records", [])
    faces = faces_judged(results)
    names = results.get("dataset", {}).get("class_names", [])
    private = results.get("private_images", {})
    held = results.get("held_out_images", {})
    defenses = [d["name"] for d in results.get("defenses", [])] or list(
        dict.fromkeys(r["defense"] for r in records)
    )
    index = {(r["target_model"], r["attack"], r["defense"], int(r["label"])): r for r in records}
    people = labels if labels is not None else sorted({int(r["label"]) for r in records})

    def image(rel: str | None) -> str | None:
        return _thumb(out_dir, rel) if inline else rel

    grids = []
    for target in dict.fromkeys(r["target_model"] for r in records):
        attacks = list(dict.fromkeys(r["attack"] for r in records if r["target_model"] == target))
        api = [a for a in attacks if a != "whitebox"]
        shown = [
            d for d in defenses if any((target, a, d, p) in index for a in api for p in people)
        ]
        rows = []
        for p in people:
            white = next(
                (index[k] for d in defenses if (k := (target, "whitebox", d, p)) in index), None
            )
            rows.append(
                {
                    "name": names[p] if p < len(names) else str(p),
                    "private": image(private.get(str(p))),
                    "held_out": image(held.get(str(p))),
                    "white": _face_cell(white, faces, image) if "whitebox" in attacks else None,
                    "cells": [
                        _face_cell(index.get((target, a, d, p)), faces, image)
                        for d in shown
                        for a in api
                    ],
                }
            )
        grids.append(
            {
                "target": target,
                "defenses": shown,
                "attacks": [ATTACK_SHORT.get(a, a) for a in api],
                "white": "whitebox" in attacks,
                "rows": rows,
            }
        )
    return grids


def _render_faces_page(
    env: Environment, results: dict[str, Any], out_dir: Path, faces: bool
) -> None:
    """``faces.html``: the faces grid of every attacked person (images by relative path)."""
    html = env.get_template("faces.html.j2").render(
        r=results,
        faces=faces,
        grids=faces_grid(results, out_dir, inline=False),
        lineup_mark=LINEUP_MARK,
    )
    _write(out_dir / "faces.html", html)


def _write(path: Path, html: str) -> None:
    tmp = path.with_suffix(".html.tmp")
    tmp.write_text(html, encoding="utf-8")
    tmp.replace(path)


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
    "held out photo blurred 2px": "the held-out photo blurred by a Gaussian of 2 px "
    "(likewise 3, 4, 6 px): the recognisability scale",
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


def _absent(x: Any) -> bool:
    return x is None or isinstance(x, Undefined)


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
    # absent (an older results.json, a judge that did not run) reads "n/a", never 0
    env.filters["pct"] = lambda x: "n/a" if _absent(x) else f"{100 * float(x):.0f} %"
    env.filters["num"] = lambda x, d=2: "n/a" if _absent(x) else f"{float(x):,.{d}f}"
    records = results.get("records", [])
    has_faces = bool(records)
    faces = faces_judged(results)
    people = sorted({int(r["label"]) for r in records})
    context = {
        "faces": faces,
        "identity_bar": identity_bar(results),
        "lineup_mark": LINEUP_MARK,
        "faces_grid": faces_grid(results, out_dir, sample_people(people), inline=True)
        if has_faces
        else [],
        "n_people": len(people),
        "sampled": len(people) > SAMPLE_PEOPLE,
        "r": results,
        "verdicts": vs,
        "answer": answer(results, vs),
        "recommendations": recommendations(results, vs),
        "mapping": MAPPING,
        "lineup_chance": LINEUP_CHANCE,
        "thresholds": thresholds(results),
        "tables": _tables(results),
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
    if has_faces:
        _render_faces_page(env, results, out_dir, faces)
    path = out_dir / "index.html"
    _write(path, html)
    return path
