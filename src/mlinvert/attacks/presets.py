"""The audit's attacker: settings per image size, its search space and its attacks.

A preset is chosen from the image size alone (never from the people reported on) and
documented in BENCHMARKS.md ("MI-Face", "Audit"); the search space is an eigenface prior
of the attacker's auxiliary photos, or a learned prior (``mlinvert.attacks.priors``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mlinvert.attacks.gradients import NES, Exact, auto_gradient
from mlinvert.attacks.label_only import LabelOnly, LabelOnlyConfig
from mlinvert.attacks.miface import MIFace, MIFaceConfig
from mlinvert.attacks.spaces import PCAPrior, Space, parse_space
from mlinvert.data.base import ImageDataset


@dataclass(frozen=True, kw_only=True)
class Preset:
    """Attack settings chosen for an image size (documented in BENCHMARKS.md)."""

    budget: int
    whitebox_iters: int
    nes_samples: int
    label_only_iters: int
    space: str  # a mlinvert.attacks.spaces.parse_space spec, or pca:K (see _space)
    augment: bool = False  # PCA prior: mirrored and shifted aux faces (faces only)
    quick_targets: bool = False


def preset_for(shape: tuple[int, int], quick: bool) -> Preset:
    """Search spaces and iteration caps per image size (all attacks share the space).

    On small images (digits) the targets train with the short settings: measured here
    they reach the same test accuracy (softmax 96.8 %, MLP 97.2 %) in seconds instead of
    a minute. The evaluation model always trains fully unless ``quick``.
    """
    pixels = shape[0] * shape[1]
    # digits: Broyden needs 21 queries per Jacobian in the 20-d prior; against coarser
    # scores NES with 20 antithetic pairs: 41 inputs per request
    if pixels <= 1024:
        p = Preset(
            budget=2000,
            whitebox_iters=200,
            nes_samples=20,
            label_only_iters=100,
            space="pca:20",
            quick_targets=True,
        )
    else:
        # faces. Black-box against an API with full-precision scores: Broyden (one
        # Jacobian of every class score by differences, 201 queries in the 200-d prior,
        # then one query per step): measured on AT&T softmax (first 10 people, in
        # process, 1100-query budget) recovered 90 % with ~470 queries, NES 10 %. Against
        # rounded or top-k scores Broyden's differences vanish (round:3: 0 % recovered)
        # and the attacker uses NES with 5 antithetic pairs (11 inputs per step) and as
        # many cosine-annealed steps as the budget pays for (1100 queries = 100 steps).
        # The prior: 200 eigenfaces of the 39 other people's held-out photos, each also
        # mirrored and shifted 2 px (BENCHMARKS.md, "MI-Face" and "Audit"). White-box:
        # the full 200 steps of MIFaceConfig.improved() (at 60 it recovered less than the
        # black-box attack: 72 / 80 % against 78 / 82 %).
        p = Preset(
            budget=1100,
            whitebox_iters=200,
            nes_samples=5,
            label_only_iters=30,
            space="pca:200",
            augment=True,
        )
    if quick:
        p = Preset(
            budget=min(p.budget, 600),
            whitebox_iters=60,
            nes_samples=p.nes_samples,
            label_only_iters=20,
            space=p.space,
            augment=p.augment,
            quick_targets=True,
        )
    return p


def search_space(
    dataset: ImageDataset,
    label: int,
    spec: str,
    *,
    augment: bool = False,
    detail: int = 0,
    radius: float | None = 1.0,
) -> Any:
    """The attacks' search space for ``label``, bound to the image size.

    ``pca:K`` is an eigenface prior from the attacker's auxiliary photos — the held-out
    photos of everyone *except* the attacked person (never a private training photo;
    PCAPrior checks it; ``augment`` adds their mirror images and 2-px shifts; ``detail``
    and ``radius`` as in PCAPrior) — other specs go to parse_space.
    """

    space: Space
    if spec.startswith("pca"):
        _, _, k = spec.partition(":")
        x_test, y_test = dataset.test()
        x_train, _ = dataset.train()
        space = PCAPrior(
            x_test[y_test != label],
            int(k or 40),
            private=x_train,
            source="held-out photos of other people",
            augment=augment,
            detail=detail,
            radius=radius,
        )
    else:
        space = parse_space(spec)
    return space.bind(dataset.image_shape)


def build_attack(
    attack: str, preset: Preset, budget: int, space: Any, *, policy: str = "full"
) -> Any:
    """The audit's ``attack`` (whitebox, blackbox, label-only) with ``preset``'s settings,
    sized to ``budget`` queries per person, searching ``space``.

    The black-box attacker reads the API's documented output ``policy``: full-precision
    scores get Broyden's extracted Jacobian, anything coarser NES (see preset_for).
    """

    p = preset
    if attack == "whitebox":
        return MIFace(
            MIFaceConfig.improved(max_iter=p.whitebox_iters), gradient=Exact(), space=space
        )
    if attack == "blackbox":
        source = auto_gradient(policy, nes=NES(samples=p.nes_samples))
        if isinstance(source, NES):  # as many cosine-annealed steps as the budget pays for
            steps = max(budget // (2 * p.nes_samples + 1), 1)
            return MIFace(MIFaceConfig.improved(max_iter=steps), gradient=source, space=space)
        return MIFace(MIFaceConfig.improved(), gradient=source, space=space)

    start = max(budget // 5, 10)
    directions = 16
    cfg = LabelOnlyConfig(
        n_directions=directions,
        start_samples=start,
        max_iter=max(min(p.label_only_iters, (budget - start) // (directions + 1)), 1),
        batch_size=50,
    )
    return LabelOnly(cfg, space=space)
