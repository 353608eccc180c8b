"""Attacker priors learned from public faces of other people (issue: GMI-style search).

``load_prior(DIR) -> Prior``; ``Prior.space(radius=..., private=..., shape=...)`` is the
search space MI-Face and the label-only attack use (white-box gradients by autograd
through the decoder, black-box estimators through the oracle). ``train_prior`` trains
one (``mlinvert prior train``). No prior imports or calls the independent judge's
networks.
"""

from mlinvert.attacks.priors.prior import (
    KINDS,
    FinetuneConfig,
    Prior,
    PriorConfig,
    finetune_prior,
    load_prior,
    thumbnails,
    train_prior,
)
from mlinvert.attacks.priors.space import PriorSpace

__all__ = [
    "KINDS",
    "FinetuneConfig",
    "Prior",
    "PriorConfig",
    "PriorSpace",
    "finetune_prior",
    "load_prior",
    "thumbnails",
    "train_prior",
]
