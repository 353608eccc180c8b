"""``FaceJudge``: scores face (or digit) reconstructions on two axes, identity and likeness.

Fit it once on the target's data set (its split says which photos were private) and
an optional evaluation model, then score reconstructions::

    judge = FaceJudge.fit(dataset, eval_model, seed=0)
    records = judge.score(recons, labels)        # one dict per reconstruction
    judge.summary(records)                       # means and rates

Each record holds (see :data:`RECORD_FIELDS`):

``eval_top1``, ``eval_top5``
    evaluation-model top-1 / top-5 hit (None without an evaluation model);
``likeness``
    ``identity_likeness * face_likeness`` in [0, 1] (:mod:`mlinvert.evaluation.likeness`):
    ~0 for grey, uniform noise and noise templates, ~0.6-1 for the person's own photos;
``identity_likeness``, ``face_likeness``
    its two components; ``likeness_z`` the raw identity contrast z-score;
``lineup_correct``
    the automated 5-way lineup picked the target (:mod:`mlinvert.evaluation.lineup`);
``pixel_nn_correct``, ``eigen_nn_correct``
    model-free identity (:mod:`mlinvert.evaluation.identity`);
``nearest_private_index``
    row in ``dataset.images`` of the private training photo of the label's identity
    nearest in MSE; ``mse`` and ``ssim`` (skimage, data_range=1) are to that photo;
``feature_distance``
    evaluation-model embedding distance to the nearest private photo of the identity,
    divided by the median distance between a private photo and the nearest photo of a
    different person (below 1: closer than other people are; None without a model);
``face_found``, ``judge_*``
    the independent face recogniser's verdict (:mod:`mlinvert.evaluation.recogniser`;
    only with ``JudgeConfig(independent=True)``, i.e. on face data; None otherwise).

The evaluation model, lineup and likeness are this project's own measures, trained on
the same private photos; on faces the verdict "recovered" is the independent judge's.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image
from skimage.metrics import structural_similarity

from mlinvert.core import Seed, rng_from
from mlinvert.data.base import ImageDataset
from mlinvert.errors import ConfigError, DataError
from mlinvert.evaluation import references
from mlinvert.evaluation.identity import (
    EigenNearestMean,
    EvalModel,
    FeatureDistance,
    PixelNN,
    check_eval_model,
    topk_hits,
)
from mlinvert.evaluation.images import check_batch, image_grid, one_blas_thread
from mlinvert.evaluation.likeness import FaceLikeness, IdentityLikeness, LikenessConfig
from mlinvert.evaluation.lineup import Lineup
from mlinvert.evaluation.recogniser import (
    JUDGE_FIELDS,
    JUDGE_MEAN_FIELDS,
    JUDGE_RATE_FIELDS,
    IndependentJudge,
)

log = logging.getLogger(__name__)

RECORD_FIELDS = (
    "label",
    "eval_top1",
    "eval_top5",
    "likeness",
    "identity_likeness",
    "face_likeness",
    "likeness_z",
    "lineup_correct",
    "pixel_nn_correct",
    "eigen_nn_correct",
    "ssim",
    "mse",
    "feature_distance",
    "nearest_private_index",
    *JUDGE_FIELDS,
)
"""Keys of every record returned by :meth:`FaceJudge.score`."""

RATE_FIELDS = (
    "eval_top1",
    "eval_top5",
    "lineup_correct",
    "pixel_nn_correct",
    "eigen_nn_correct",
    *JUDGE_RATE_FIELDS,
)
MEAN_FIELDS = (
    "likeness",
    "identity_likeness",
    "face_likeness",
    "ssim",
    "mse",
    "feature_distance",
    *JUDGE_MEAN_FIELDS,
)

#: Image data sets that are not faces, by the kind in their spec, and what they hold:
#: the independent face recogniser does not judge them, and the report says what
#: "person" and "face" stand for there.
NOT_FACES = {"digits": "handwritten digits"}

#: Gaussian blurs (sigma in pixels) of the held-out photo: the recognisability scale
#: the independent judge's results are read against ("as recognisable as a photo
#: blurred by 3 px").
BLUR_SCALE = (2.0, 3.0, 4.0, 6.0)


def _ssim_window(shape: tuple[int, int]) -> int:
    """Largest odd SSIM window <= 7 that fits the image (8x8 digits use 7)."""
    w = min(7, *shape)
    return w if w % 2 == 1 else w - 1


@dataclass(frozen=True, kw_only=True)
class JudgeConfig:
    """Settings of a :class:`FaceJudge`: the likeness terms and the lineup size."""

    likeness: LikenessConfig = field(default_factory=LikenessConfig)
    lineup_size: int = 5
    #: enrol the independent face recogniser (face data only: it judges faces)
    independent: bool = False

    def __post_init__(self) -> None:
        if self.lineup_size < 2:
            raise ConfigError(
                f"lineup_size must be >= 2 (the paper's study used 5), got {self.lineup_size}"
            )


class FaceJudge:
    """Identity and likeness measures of reconstructions against the private photos."""

    def __init__(self, config: JudgeConfig | None = None) -> None:
        self.config = config or JudgeConfig()
        self.dataset_: ImageDataset | None = None
        self.eval_model_: EvalModel | None = None
        self.independent_: IndependentJudge | None = None
        self.seed_: int = 0

    @classmethod
    def fit(
        cls,
        dataset: ImageDataset,
        eval_model: Any = None,
        *,
        seed: Seed,
        config: JudgeConfig | None = None,
    ) -> FaceJudge:
        """Learn every measure from ``dataset`` (train split = private photos).

        ``eval_model`` needs ``predict_proba`` and ``embed``; None leaves ``eval_top1``,
        ``eval_top5`` and ``feature_distance`` as None.
        """
        if not isinstance(dataset, ImageDataset):
            raise DataError(
                f"FaceJudge needs an ImageDataset (faces or digits), got "
                f"{type(dataset).__name__}; survey data sets use the tree evaluation"
            )
        if dataset.n_classes < 3:
            raise DataError(
                f"FaceJudge needs at least 3 identities (likeness compares the target with "
                f"the others), the data set has {dataset.n_classes}"
            )
        judge = cls(config)
        judge._fit(dataset, eval_model, rng_from(seed))
        return judge

    @one_blas_thread
    def _fit(self, dataset: ImageDataset, eval_model: Any, rng: np.random.Generator) -> None:
        self.seed_ = int(rng.integers(0, 2**31 - 1))
        k = dataset.n_classes
        if eval_model is not None:
            self.eval_model_ = check_eval_model(eval_model, k)
        private, plabels = dataset.train()
        held, hlabels = dataset.test()
        missing = sorted(set(range(k)) - set(np.unique(plabels).tolist()))
        if missing:
            raise DataError(
                f"identities {missing[:5]} have no private training photo; the judge needs "
                "at least one per identity"
            )
        self.dataset_ = dataset
        self.private_ = private
        self.private_labels_ = plabels
        self.private_rows_ = dataset.split.train
        self.held_ = held
        self.held_labels_ = hlabels
        self.identity_ = IdentityLikeness(self.config.likeness.identity_floor_z).fit(
            private, plabels, k
        )
        self.face_ = FaceLikeness(self.config.likeness).fit(private, plabels, k, seed=rng)
        self.pixel_nn_ = PixelNN().fit(private, plabels)
        self.eigen_ = EigenNearestMean().fit(private, plabels, k)
        self.lineup_ = Lineup(self.config.lineup_size).fit(private, held, hlabels)
        self.means_ = references.class_means(private, plabels, k)
        self.templates_ = references.identity_templates(self.means_, private)
        if self.eval_model_ is not None:
            self.features_ = FeatureDistance().fit(self.eval_model_.embed(private), plabels)
        if self.config.independent:
            self.independent_ = IndependentJudge.enrol(private, plabels, k)
        log.info(
            "FaceJudge fitted: %d identities, %d private photos, z_ref=%.2f, face share "
            "photo=%.3f noise=%.3f",
            k,
            private.shape[0],
            self.identity_.z_ref_,
            self.face_.share_photo_,
            self.face_.share_noise_,
        )

    def _fitted(self) -> ImageDataset:
        if self.dataset_ is None:
            raise DataError("FaceJudge is not fitted; create it with FaceJudge.fit(...)")
        return self.dataset_

    @one_blas_thread
    def score(self, recons: np.ndarray, labels: np.ndarray) -> list[dict[str, Any]]:
        """One record per reconstruction (see the module docstring for the fields)."""
        ds = self._fitted()
        x, y = check_batch(recons, labels, ds.image_shape, ds.n_classes)
        if x.shape[0] == 0:
            return []
        a_id = self.identity_.score(x, y)
        z = self.identity_.zscores(x, y)
        a_face = self.face_.score(x, y)
        pixel = self.pixel_nn_.predict(x) == y
        eigen = self.eigen_.predict(x) == y
        lineup = self.lineup_.run(x, y, seed=self.seed_)
        top1: np.ndarray | None = None
        top5: np.ndarray | None = None
        feat: np.ndarray | None = None
        if self.eval_model_ is not None:
            probs = np.asarray(self.eval_model_.predict_proba(x))
            top1 = topk_hits(probs, y, 1)
            top5 = topk_hits(probs, y, 5)
            feat = self.features_.distance(self.eval_model_.embed(x), y)
        win = _ssim_window(ds.image_shape)
        judged = (
            self.independent_.score(x, y)
            if self.independent_ is not None
            else [dict.fromkeys(JUDGE_FIELDS) for _ in range(x.shape[0])]
        )
        records: list[dict[str, Any]] = []
        for i in range(x.shape[0]):
            own = np.flatnonzero(self.private_labels_ == y[i])
            mses = ((self.private_[own] - x[i]) ** 2).reshape(own.size, -1).mean(axis=1)
            j = int(own[int(np.argmin(mses))])
            ssim = structural_similarity(x[i], self.private_[j], data_range=1.0, win_size=win)
            records.append(
                {
                    "label": int(y[i]),
                    "eval_top1": None if top1 is None else bool(top1[i]),
                    "eval_top5": None if top5 is None else bool(top5[i]),
                    "likeness": float(a_id[i] * a_face[i]),
                    "identity_likeness": float(a_id[i]),
                    "face_likeness": float(a_face[i]),
                    "likeness_z": float(z[i]),
                    "lineup_correct": bool(lineup[i]),
                    "pixel_nn_correct": bool(pixel[i]),
                    "eigen_nn_correct": bool(eigen[i]),
                    "ssim": float(ssim),
                    "mse": float(np.min(mses)),
                    "feature_distance": None if feat is None else float(feat[i]),
                    "nearest_private_index": int(self.private_rows_[j]),
                    **judged[i],
                }
            )
        return records

    @staticmethod
    def summary(records: list[dict[str, Any]]) -> dict[str, Any]:
        """Rates of the boolean fields and means of the numeric ones (None if absent)."""
        out: dict[str, Any] = {"n": len(records)}
        for key in RATE_FIELDS + MEAN_FIELDS:
            vals = [r[key] for r in records if r.get(key) is not None]
            out[key] = float(np.mean(vals)) if vals else None
        return out

    def reference_points(self, labels: np.ndarray, *, seed: Seed) -> dict[str, np.ndarray]:
        """Grey, uniform noise, noise template, held-out photo and private mean per label;
        with the independent judge also the held-out photo blurred by each
        :data:`BLUR_SCALE` sigma (the recognisability scale)."""
        ds = self._fitted()
        _, y = check_batch(
            np.zeros((np.asarray(labels).shape[0], *ds.image_shape), dtype=np.float32),
            np.asarray(labels),
            ds.image_shape,
            ds.n_classes,
        )
        rng = rng_from(seed)
        points = {
            "grey": references.grey(y.size, ds.image_shape),
            "uniform_noise": references.uniform_noise(y.size, ds.image_shape, seed=rng),
            "noise_template": references.noise_template(self.templates_, y, seed=rng),
            "held_out_photo": references.held_out_photo(self.held_, self.held_labels_, y, seed=rng),
            "private_mean": references.private_mean(self.means_, y),
        }
        if self.config.independent:
            for sigma in BLUR_SCALE:
                points[f"held_out_photo_blurred_{sigma:g}px"] = references.blurred(
                    points["held_out_photo"], sigma
                )
        return points

    def private_photo(self, record: dict[str, Any]) -> np.ndarray:
        """The private training photo a record was compared with (for grids)."""
        return self._fitted().images[int(record["nearest_private_index"])]

    def pair_grid(
        self,
        recons: np.ndarray,
        labels: np.ndarray,
        *,
        scale: int = 2,
        records: list[dict[str, Any]] | None = None,
    ) -> Image.Image:
        """PNG-ready grid: each reconstruction beside the nearest private photo of its
        identity (rows titled with the class name and, if given, the likeness)."""
        ds = self._fitted()
        x, y = check_batch(recons, labels, ds.image_shape, ds.n_classes)
        recs = records if records is not None else self.score(x, y)
        rows = [[x[i], self.private_photo(recs[i])] for i in range(x.shape[0])]
        titles = [
            f"{ds.class_names[int(y[i])]} L={recs[i]['likeness']:.2f}" for i in range(len(recs))
        ]
        return image_grid(
            rows, scale=scale, row_titles=titles, col_titles=["reconstruction", "private"]
        )
