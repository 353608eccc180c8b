"""One training job (``mlinvert train``): load a data set, train a target, save its folder.

:class:`TrainJob` is the frozen config the CLI builds from its options;
:func:`train_job` does the work and returns the model card.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mlinvert.data import load as load_data
from mlinvert.errors import ConfigError
from mlinvert.targets.dp import DPConfig
from mlinvert.targets.io import save
from mlinvert.targets.training import KINDS, dp_config, public_pretrain, train_target

if TYPE_CHECKING:  # the dae module imports torch
    from mlinvert.targets.dae import PublicPretrain

#: Shows one stage of a job while it runs: ``stage("loading", "digits")`` returns a
#: context manager entered for the duration of the stage (a spinner in the CLI).
Stage = Callable[[str, str], AbstractContextManager[Any]]


def _quiet(verb: str, what: str) -> AbstractContextManager[Any]:
    return nullcontext()


@dataclass(frozen=True, kw_only=True)
class TrainJob:
    """What to train on what, and where to write it.

    ``dp_epsilon`` trains by DP-SGD (``dp_delta`` defaults to the trainer's); the dae can
    be pre-trained on the public face set ``public_data`` first, ``private_stages`` then
    reading the private images (``head`` by default). Validated on creation, which also
    derives ``public`` (the dae's public pre-training) and ``dp`` (the DP-SGD settings)
    and refuses an ``out_dir`` that already holds a model.
    """

    data: str = "digits"
    kind: str = "softmax"
    out_dir: Path
    seed: int = 0
    quick: bool = False
    dp_epsilon: float | None = None
    dp_delta: float | None = None
    public_data: str | None = None
    private_stages: str | None = None
    public: PublicPretrain | None = field(init=False, default=None)
    dp: DPConfig | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        kind = self.kind.strip().lower()
        if kind not in KINDS:
            raise ConfigError(
                f"unknown model kind {self.kind!r}; choose one of: {', '.join(KINDS)}"
            )
        if self.dp_delta is not None and self.dp_epsilon is None:
            raise ConfigError("--dp-delta needs --dp-epsilon (the privacy target of DP-SGD)")
        if self.private_stages is not None and self.public_data is None:
            raise ConfigError(
                "--private-stages needs --public-pretrain (the public face set, e.g. lfw)"
            )
        if self.public_data is not None:
            if kind != "dae":
                raise ConfigError(
                    f"--public-pretrain is available for --model dae only, not {self.kind!r}"
                )
            public = public_pretrain(
                self.public_data, self.private_stages or "head", quick=self.quick
            )
            object.__setattr__(self, "public", public)
        if self.dp_epsilon is not None:
            private = None if self.public is None else self.public.private
            dp = dp_config(
                self.kind, self.dp_epsilon, delta=self.dp_delta, quick=self.quick, private=private
            )
            object.__setattr__(self, "dp", dp)
        if (self.out_dir / "model.json").exists():
            raise ConfigError(
                f"--out {self.out_dir} already holds a trained model (model.json); choose "
                "another --out, or delete that folder first to replace the model"
            )


def train_job(job: TrainJob, *, stage: Stage = _quiet) -> dict[str, Any]:
    """Load ``job.data``, train ``job.kind`` on its private split and save the model to
    ``job.out_dir``; returns the card. ``stage`` shows the loading and the training while
    they run."""
    with stage("loading", job.data):
        dataset = load_data(job.data, seed=job.seed)
    with stage("training", f"{job.kind} on {dataset.spec} (seed {job.seed})"):
        trained = train_target(
            dataset, job.kind, seed=job.seed, quick=job.quick, dp=job.dp, public=job.public
        )
    save(trained.model, job.out_dir, card=trained.card)
    return trained.card


__all__ = ["Stage", "TrainJob", "train_job"]
