"""Evaluation of reconstructions: identity and likeness of faces (``faces``), and the
tree-inversion measures (``trees``).

The face measures answer two questions for every reconstruction (PAPER.md, "What
counts as a recovered face"): does it point to the right person (evaluation-model
top-1/top-5, pixel and eigenface nearest neighbour, a 5-way lineup), and does it look
like a face, like that person (``likeness``)?
"""

from mlinvert.evaluation.faces import RECORD_FIELDS, FaceJudge, JudgeConfig
from mlinvert.evaluation.images import image_grid
from mlinvert.evaluation.likeness import LikenessConfig
from mlinvert.evaluation.references import REFERENCE_NAMES

__all__ = [
    "RECORD_FIELDS",
    "REFERENCE_NAMES",
    "FaceJudge",
    "JudgeConfig",
    "LikenessConfig",
    "image_grid",
]
