"""Matplotlib figures of an audit, returned as PNG bytes (Agg backend, no display)."""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from mlinvert.core import API_ATTACKS
from mlinvert.data.images import to_uint8
from mlinvert.report.summary import Cell, cells, faces_judged, utility_of

_MARKERS = {"whitebox": "s", "blackbox": "o", "label-only": "^"}


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=96, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


#: tab10 without its grey (index 7), which the legends use for marker shapes.
_PALETTE = [i for i in range(10) if i != 7]


def _colours(defenses: Sequence[str]) -> dict[str, Any]:
    cmap = plt.get_cmap("tab10")
    return {d: cmap(_PALETTE[i % len(_PALETTE)]) for i, d in enumerate(defenses)}


def accuracy_vs_queries(results: dict[str, Any]) -> bytes:
    """Attack accuracy (identity and recovered) against median queries, per defence.

    One row of two panels per target; one point per (attack, defence): marker =
    attack, colour = defence. A white-box attack's "queries" are gradient steps on
    the model, not API calls, and no output defence changes them: it is drawn black.
    A median of 0 queries is drawn at 1 (log axis).
    """
    cs = cells(results.get("records", []))
    defenses = list(dict.fromkeys(c.defense for c in cs))
    targets = list(dict.fromkeys(c.target_model for c in cs)) or [""]
    colour = _colours(defenses)
    fig, axes = plt.subplots(
        len(targets), 2, figsize=(11, 3.6 * len(targets)), sharex=True, sharey=True, squeeze=False
    )
    panels = (
        (
            ("judge_lineup", "independent recogniser: 5-way lineup (chance 20 %)"),
            ("recovered", "recovered: it names the right person"),
        )
        if faces_judged(results)
        else (
            ("eval_top1", "identity: evaluation-model top-1"),
            ("recovered", "recovered: identity AND likeness"),
        )
    )
    for row, target in zip(axes, targets, strict=True):
        for ax, (field, title) in zip(row, panels, strict=True):
            for c in cs:
                if c.target_model != target:
                    continue
                ax.scatter(
                    max(c.median_queries or 0.0, 1.0),
                    100 * float(getattr(c, field) or 0.0),
                    marker=_MARKERS.get(c.attack, "D"),
                    # output defences do not reach the white-box attack: one black point
                    color="black" if c.attack == "whitebox" else colour[c.defense],
                    edgecolors="black",
                    linewidths=0.5,
                    s=55,
                    alpha=0.85,
                )
            ax.set_xscale("log")
            ax.set_ylim(-5, 105)
            ax.set_title(f"target {target} — {title}", fontsize=10)
            ax.grid(alpha=0.3)
        row[0].set_ylabel("attack accuracy (% of people)")
    for ax in axes[-1]:
        ax.set_xlabel("median queries per attacked person (log scale; 0 drawn at 1)")
    _legend(fig, defenses, colour, {c.attack for c in cs})
    return _png(fig)


def _legend(
    fig: Figure, defenses: Sequence[str], colour: dict[str, Any], attacks: set[str]
) -> None:
    handles = [
        plt.Line2D([], [], marker="o", linestyle="", color=colour[d], label=f"defence {d}")
        for d in defenses
    ]
    handles += [
        plt.Line2D(
            [],
            [],
            marker=_MARKERS.get(a, "D"),
            linestyle="",
            markerfacecolor="white",
            markeredgecolor="black",
            label=f"attack {a}"
            + (" (black: gradient steps, any defence)" if a == "whitebox" else ""),
        )
        for a in sorted(attacks)
    ]
    fig.legend(handles=handles, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)


def privacy_utility(results: dict[str, Any]) -> bytes:
    """The highest API-attack identity rate against each defence's utility for honest users.

    Left: Brier score of the returned scores (lower is better for users: it grows as a
    defence withholds or coarsens information); right: top-k usability. One point per
    (target, defence), labelled with the defence.
    """
    faces = faces_judged(results)
    by_key: dict[tuple[str, str], list[Cell]] = {}
    for c in cells(results.get("records", [])):
        if c.attack in API_ATTACKS:
            by_key.setdefault((c.target_model, c.defense), []).append(c)
    defenses = list(dict.fromkeys(d for _, d in by_key))
    colour = _colours(defenses)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    targets = list(dict.fromkeys(t for t, _ in by_key))
    shapes = {t: "osD^v"[i % 5] for i, t in enumerate(targets)}
    style = _PointStyle(colour=colour, shapes=shapes, first_target=targets[0] if targets else "")
    _utility_panel(
        axes[0],
        results,
        by_key,
        "brier",
        "Brier score of the returned scores (honest users; lower is better)",
        style,
        faces,
    )
    k = next(
        (
            utility_of(results, t, d).get("k")
            for t, d in by_key
            if utility_of(results, t, d).get("k")
        ),
        3,
    )
    topk_label = f"top-{k} usability for honest users (% test rows, true class in top {k})"
    _utility_panel(axes[1], results, by_key, "topk_accuracy", topk_label, style, faces)
    axes[0].set_ylabel(
        "highest API-attack recovered (% of people)"
        if faces
        else "highest API-attack evaluation top-1 (% of people)"
    )
    fig.suptitle(
        "privacy–utility trade-off: lower is more private; better for honest users is "
        "further left (Brier) and further right (top-k)",
        fontsize=10,
    )
    _target_legend(fig, defenses, colour, targets, shapes)
    return _png(fig)


@dataclass(frozen=True, kw_only=True)
class _PointStyle:
    """How a (target, defence) point is drawn: colour by defence, marker by target; only
    the first target's points are labelled."""

    colour: dict[str, Any]
    shapes: dict[str, str]
    first_target: str


def _utility_panel(
    ax: Any,
    results: dict[str, Any],
    by_key: dict[tuple[str, str], list[Cell]],
    field: str,
    xlabel: str,
    style: _PointStyle,
    faces: bool,
) -> None:
    """One panel: the highest API-attack rate of each (target, defence) against its
    utility ``field`` (top-k in %), the first target's points labelled by defence."""
    names: dict[tuple[float, float], list[str]] = {}  # first target's defences per point
    for (target, defense), group in by_key.items():
        x = utility_of(results, target, defense).get(field)
        if x is None:
            continue
        xv = x * (100 if field == "topk_accuracy" else 1)
        y = 100 * max(c.recovered if faces else c.eval_top1 for c in group)
        ax.scatter(
            xv, y, color=style.colour[defense], marker=style.shapes[target], s=60, alpha=0.85
        )
        if target == style.first_target:  # to the tables' precision: near points share a label
            key = (round(xv, 3 if field == "brier" else 1), round(y))
            names.setdefault(key, []).append(defense)
    for (xv, y), ds in names.items():
        ax.annotate(", ".join(ds), (xv, y), fontsize=7, xytext=(4, 3), textcoords="offset points")
    ax.set_xlabel(xlabel)
    ax.xaxis.set_major_locator(MaxNLocator(5))
    ax.grid(alpha=0.3)
    ax.set_ylim(-5, 105)


def _target_legend(
    fig: Figure,
    defenses: Sequence[str],
    colour: dict[str, Any],
    targets: Sequence[str],
    shapes: dict[str, str],
) -> None:
    """Colour per defence, marker per target (no legend when nothing was drawn)."""
    handles = [
        plt.Line2D([], [], marker="o", linestyle="", color=colour[d], label=f"defence {d}")
        for d in defenses
    ]
    handles += [
        plt.Line2D(
            [],
            [],
            marker=shapes[t],
            linestyle="",
            markerfacecolor="white",
            markeredgecolor="black",
            label=f"target {t}",
        )
        for t in targets
    ]
    if handles:
        fig.legend(handles=handles, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)


def image_grid(
    columns: Sequence[str],
    rows: Sequence[tuple[str, Sequence[np.ndarray | None], Sequence[bool]]],
    *,
    cell: int = 96,
) -> bytes:
    """A labelled grid PNG: one column per person, one row per image source.

    ``rows`` holds ``(row title, images, highlight)``; every image is scaled (nearest
    neighbour) to fit a ``cell``-pixel square; a highlighted cell gets a green frame
    (used for *recovered* reconstructions); a missing image shows as a hatched cell.
    Drawn with Pillow (fast: an audit has dozens of grids).
    """
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=13)
    pad, left, top = 6, 150, 22
    n_cols = max(len(columns), 1)
    width = left + n_cols * (cell + pad) + pad
    height = top + len(rows) * (cell + pad) + pad
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    for j, name in enumerate(columns):
        x = left + pad + j * (cell + pad)
        draw.text((x + cell // 2, top - 4), str(name)[:14], fill="#333333", font=font, anchor="md")
    for i, (title, images, marks) in enumerate(rows):
        y = top + pad + i * (cell + pad)
        for k, line in enumerate(str(title).split("\n")[:3]):
            draw.text(
                (left - 8, y + cell // 2 + (k - 0.5) * 15),
                line,
                fill="#222222",
                font=font,
                anchor="rm",
            )
        for j in range(n_cols):
            x = left + pad + j * (cell + pad)
            img = images[j] if j < len(images) else None
            if img is None:
                draw.rectangle((x, y, x + cell - 1, y + cell - 1), outline="#bbbbbb")
                draw.line((x, y, x + cell - 1, y + cell - 1), fill="#dddddd")
                continue
            arr = to_uint8(img)
            h, w = arr.shape
            scale = cell / max(h, w)
            tile = Image.fromarray(arr, mode="L").resize(
                (max(int(w * scale), 1), max(int(h * scale), 1)), Image.Resampling.NEAREST
            )
            ox, oy = x + (cell - tile.width) // 2, y + (cell - tile.height) // 2
            canvas.paste(tile.convert("RGB"), (ox, oy))
            if j < len(marks) and marks[j]:
                draw.rectangle(
                    (ox - 3, oy - 3, ox + tile.width + 2, oy + tile.height + 2),
                    outline="#1a9850",
                    width=3,
                )
    buf = io.BytesIO()
    canvas.save(buf, format="PNG", optimize=True)
    return buf.getvalue()
