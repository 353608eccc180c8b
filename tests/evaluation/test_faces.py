"""FaceJudge: identity and likeness on the reference points, lineup chance, SSIM/MSE,
determinism, digits and bad input."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from mlinvert.data import ImageDataset
from mlinvert.data.images import save_png
from mlinvert.errors import ConfigError, DataError, MlinvertError, ModelError
from mlinvert.evaluation import (
    RECORD_FIELDS,
    REFERENCE_NAMES,
    FaceJudge,
    JudgeConfig,
    LikenessConfig,
    image_grid,
)

ALL = np.repeat(np.arange(40), 2)
Summaries = dict[str, dict[str, Any]]


def _summaries(judge: FaceJudge, labels: np.ndarray, seed: int = 1) -> dict[str, dict]:
    refs = judge.reference_points(labels, seed=seed)
    assert set(refs) == set(REFERENCE_NAMES)
    return {name: judge.summary(judge.score(imgs, labels)) for name, imgs in refs.items()}


def test_held_out_photo_is_a_face_of_that_person(att_reference_summaries: Summaries) -> None:
    s = att_reference_summaries["held_out_photo"]
    assert s["likeness"] >= 0.6
    assert s["eval_top1"] >= 0.8
    assert s["eval_top5"] >= s["eval_top1"]
    assert s["pixel_nn_correct"] >= 0.8
    assert s["eigen_nn_correct"] >= 0.75
    assert s["lineup_correct"] >= 0.7
    # the photo itself is never its own lineup candidate (that would give exactly 1.0)
    assert s["lineup_correct"] < 1.0


def test_grey_noise_and_noise_template_score_low_likeness(att_judge: FaceJudge) -> None:
    refs = att_judge.reference_points(ALL, seed=2)
    for name in ("grey", "uniform_noise", "noise_template"):
        recs = att_judge.score(refs[name], ALL)
        likeness = np.array([r["likeness"] for r in recs])
        assert likeness.mean() <= 0.2, name
        assert np.quantile(likeness, 0.95) <= 0.3, name


def test_noise_template_is_identified_but_not_a_face(
    att_reference_summaries: Summaries,
) -> None:
    """The key property: a discriminative template in noise fools identity measures
    (as NES noise fooled the eigenface matcher in PAPER.md) but not likeness."""
    s = att_reference_summaries["noise_template"]
    assert s["eigen_nn_correct"] >= 0.7
    assert s["identity_likeness"] >= 0.7
    assert s["face_likeness"] <= 0.25
    assert s["likeness"] <= 0.2


def test_lineup_on_random_noise_is_near_chance(att_judge: FaceJudge) -> None:
    labels = np.repeat(np.arange(40), 15)
    noise = np.random.default_rng(3).random((labels.size, 112, 92)).astype(np.float32)
    rate = np.mean(att_judge.lineup_.run(noise, labels, seed=4))
    assert 0.14 <= rate <= 0.26  # chance 0.2; 600 draws, sd ~ 0.016


def test_private_photo_has_ssim_one_and_zero_mse(att: ImageDataset, att_judge: FaceJudge) -> None:
    rows = att.split.train[[0, 50, 200]]
    recs = att_judge.score(att.images[rows], att.labels[rows])
    for row, r in zip(rows, recs, strict=True):
        assert r["nearest_private_index"] == row
        assert r["ssim"] == pytest.approx(1.0)
        assert r["mse"] == pytest.approx(0.0)
        assert r["feature_distance"] == pytest.approx(0.0, abs=1e-4)
        assert set(r) == set(RECORD_FIELDS)


def test_ssim_mse_and_feature_distance_order_photo_before_noise(
    att_reference_summaries: Summaries,
) -> None:
    s = att_reference_summaries
    photo, noise = s["held_out_photo"], s["uniform_noise"]
    assert photo["ssim"] > 0.3 > 0.05 > noise["ssim"]
    assert photo["mse"] < noise["mse"] / 4
    assert photo["feature_distance"] < 1.0 < noise["feature_distance"]


def test_same_seed_same_records(att: ImageDataset) -> None:
    labels = np.arange(10)
    small = att.subset(10)
    a = FaceJudge.fit(small, None, seed=7)
    b = FaceJudge.fit(small, None, seed=7)
    ra, rb = a.reference_points(labels, seed=5), b.reference_points(labels, seed=5)
    for name in REFERENCE_NAMES:
        np.testing.assert_array_equal(ra[name], rb[name])
        assert a.score(ra[name], labels) == b.score(rb[name], labels)


def test_without_eval_model_model_fields_are_none(att: ImageDataset) -> None:
    judge = FaceJudge.fit(att.subset(8), None, seed=0)
    labels = np.arange(8)
    recs = judge.score(judge.reference_points(labels, seed=0)["held_out_photo"], labels)
    assert all(r["eval_top1"] is None and r["feature_distance"] is None for r in recs)
    s = judge.summary(recs)
    assert s["eval_top1"] is None and s["n"] == 8
    assert s["likeness"] > 0.5


def test_few_identities_shrink_the_lineup(att: ImageDataset) -> None:
    judge = FaceJudge.fit(att.subset(4), None, seed=0)
    assert judge.lineup_.size == 4
    labels = np.arange(4)
    recs = judge.score(judge.reference_points(labels, seed=0)["held_out_photo"], labels)
    assert sum(r["lineup_correct"] for r in recs) >= 3
    assert np.mean([r["likeness"] for r in recs]) > 0.5


def test_digits_work_with_relative_filter_sizes(
    digits: ImageDataset, digits_eval_model: object
) -> None:
    judge = FaceJudge.fit(digits, digits_eval_model, seed=0)
    labels = np.repeat(np.arange(10), 10)
    s = _summaries(judge, labels)
    assert s["held_out_photo"]["likeness"] >= 0.5
    assert s["held_out_photo"]["eval_top1"] >= 0.8
    assert s["held_out_photo"]["lineup_correct"] >= 0.6
    for name in ("grey", "uniform_noise"):
        assert s[name]["likeness"] <= 0.2, name


def test_pair_grid_shows_reconstruction_beside_private_photo(att_judge: FaceJudge) -> None:
    labels = np.arange(3)
    img = att_judge.pair_grid(att_judge.reference_points(labels, seed=0)["grey"], labels)
    assert isinstance(img, Image.Image)
    assert img.height >= 3 * 112 * 2 and img.width >= 2 * 92 * 2


@pytest.mark.parametrize(
    ("images", "labels"),
    [
        (np.zeros((112, 92), np.float32), np.array([0])),
        (np.zeros((2, 64, 64), np.float32), np.array([0, 1])),
        (np.zeros((2, 112, 92), np.float32), np.array([0])),
        (np.zeros((1, 112, 92), np.float32), np.array([40])),
        (np.full((1, 112, 92), np.nan, np.float32), np.array([0])),
        (np.zeros((1, 112, 92), np.float32), np.array([0.5])),
    ],
)
def test_bad_input_raises_clear_error(
    att_judge: FaceJudge, images: np.ndarray, labels: np.ndarray
) -> None:
    with pytest.raises(DataError, match=r"expected|must"):
        att_judge.score(images, labels)


def test_bad_models_configs_and_unfitted_use(att: ImageDataset) -> None:
    with pytest.raises(ModelError, match="predict_proba"):
        FaceJudge.fit(att, object(), seed=0)
    with pytest.raises(ConfigError):
        LikenessConfig(n_folds=1)
    with pytest.raises(ConfigError, match="lineup_size"):
        JudgeConfig(lineup_size=1)
    with pytest.raises(MlinvertError, match="not fitted"):
        FaceJudge().score(np.zeros((1, 112, 92), np.float32), np.array([0]))
    with pytest.raises(DataError, match="at least 3 identities"):
        FaceJudge.fit(att.subset(2), None, seed=0)
    with pytest.raises(DataError, match="ImageDataset"):
        FaceJudge.fit("att", None, seed=0)  # type: ignore[arg-type]


def test_image_grid_and_png(tmp_path: Path) -> None:
    rows = [[np.zeros((8, 8), np.float32), np.ones((8, 8), np.float32)]] * 3
    img = image_grid(rows, scale=4, pad=2, col_titles=["a", "b"])
    assert img.mode == "L" and img.width == 2 + 2 * (32 + 2) and img.height == 14 + 2 + 3 * 34
    arr = np.asarray(img)
    assert arr[14 + 2 + 5, 2 + 5] == 0 and arr[14 + 2 + 5, 2 + 34 + 5] == 255
    path = save_png(tmp_path / "sub" / "grid.png", img)
    with Image.open(path) as back:
        assert back.size == img.size
    with pytest.raises(DataError, match="equally shaped"):
        image_grid([[np.zeros((8, 8)), np.zeros((4, 4))]])
    with pytest.raises(DataError, match="at least one"):
        image_grid([])


def test_a_face_of_the_wrong_person_is_not_a_likeness(
    att: ImageDataset, att_judge: FaceJudge
) -> None:
    x, y = att.train()
    means = np.stack([x[y == c].mean(axis=0) for c in range(40)]).astype(np.float32)
    labels = np.arange(40)
    right = att_judge.summary(att_judge.score(means, labels))
    wrong = att_judge.summary(att_judge.score(np.roll(means, 1, axis=0), labels))
    assert right["likeness"] >= 0.7 and right["face_likeness"] >= 0.9
    assert wrong["face_likeness"] >= 0.9  # still a face ...
    assert wrong["likeness"] <= 0.15  # ... but not this person


def test_judge_with_the_project_evaluation_model(digits: ImageDataset) -> None:
    """Contract with mlinvert.targets: the real evaluation model plugs in (quick mode)."""
    from mlinvert.targets.training import train_target

    small = digits.subset(5)
    model = train_target(small, "evaluation", seed=0, quick=True).model
    judge = FaceJudge.fit(small, model, seed=0)
    labels = np.repeat(np.arange(5), 4)
    refs = judge.reference_points(labels, seed=0)
    photo = judge.summary(judge.score(refs["held_out_photo"], labels))
    noise = judge.summary(judge.score(refs["uniform_noise"], labels))
    assert photo["eval_top1"] >= 0.6 and photo["eval_top5"] >= 0.9
    assert photo["feature_distance"] < noise["feature_distance"]
