"""Model-inversion attacks: MI-Face (white-box and black-box), label-only inversion.

Fredrikson, Jha, Ristenpart, CCS 2015 (MI-Face); Kahla et al., CVPR 2022 (BREP-MI).
Black-box is composition: ``MIFace(config, gradient=Broyden() | NES(...),
space=PCAPrior(aux))``; :func:`run_lockstep` attacks several labels at once, their
probes sharing each request.
"""

from mlinvert.attacks.base import AttackResult, ProgressEvent, image_grid
from mlinvert.attacks.checkpoint import Checkpoint
from mlinvert.attacks.gradients import (
    NES,
    SPSA,
    Broyden,
    Exact,
    FiniteDifferences,
    parse_gradient,
)
from mlinvert.attacks.label_only import LabelOnly, LabelOnlyConfig
from mlinvert.attacks.lockstep import run_lockstep
from mlinvert.attacks.miface import MIFace, MIFaceConfig
from mlinvert.attacks.spaces import DCT, LowRes, PCAPrior, Pixel, parse_space

__all__ = [
    "DCT",
    "NES",
    "SPSA",
    "AttackResult",
    "Broyden",
    "Checkpoint",
    "Exact",
    "FiniteDifferences",
    "LabelOnly",
    "LabelOnlyConfig",
    "LowRes",
    "MIFace",
    "MIFaceConfig",
    "PCAPrior",
    "Pixel",
    "ProgressEvent",
    "image_grid",
    "parse_gradient",
    "parse_space",
    "run_lockstep",
]
