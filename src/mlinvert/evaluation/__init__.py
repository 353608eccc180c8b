"""The judges: what a reconstruction shows, and what a defence costs honest users.

On faces the verdict is the independent face recogniser's (``recogniser``: dlib, which
never saw these people and which no attack may use); beside it this project's own
measures answer whether a reconstruction points to the right person (evaluation-model
top-1/top-5, pixel and eigenface nearest neighbour, a 5-way lineup) and whether it
looks like that person (``likeness``). ``trees`` measures attribute inversion of
survey trees; ``utility`` the accuracy and calibration honest clients are served.
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
