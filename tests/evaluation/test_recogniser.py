"""The independent face judge (dlib's pretrained recogniser): real photos of AT&T people
are recognised, noise and grey are at chance, the lineup probability is exact, and a
judge that was not enrolled says so instead of scoring."""

from __future__ import annotations

from itertools import combinations

import numpy as np
import pytest

from mlinvert.data import ImageDataset
from mlinvert.errors import DataError
from mlinvert.evaluation.faces import FaceJudge, JudgeConfig
from mlinvert.evaluation.recogniser import (
    JUDGE_FIELDS,
    IndependentJudge,
    lineup_chance_bar,
    lineup_probability,
    ranks,
)

PEOPLE = 12  # the judge costs ~0.14 s a photo: 12 people x 7 private photos to enrol


@pytest.fixture(scope="module")
def faces(att: ImageDataset) -> ImageDataset:
    return att.subset(PEOPLE)


@pytest.fixture(scope="module")
def face_judge(faces: ImageDataset) -> FaceJudge:
    return FaceJudge.fit(faces, None, seed=0, config=JudgeConfig(independent=True))


@pytest.fixture(scope="module")
def judge(face_judge: FaceJudge) -> IndependentJudge:
    assert face_judge.independent_ is not None
    return face_judge.independent_


def test_a_real_held_out_photo_is_recognised(faces: ImageDataset, judge: IndependentJudge) -> None:
    x, y = faces.test()
    first = np.asarray([np.flatnonzero(y == c)[0] for c in range(PEOPLE)])
    s = IndependentJudge.summary(judge.score(x[first], y[first]))
    assert s["judge_top1"] >= 0.9
    assert s["judge_lineup5"] >= 0.95
    assert s["face_found"] >= 0.9
    assert s["judge_same_person"] >= 0.9


def test_noise_and_grey_are_at_chance(judge: IndependentJudge) -> None:
    people = np.arange(PEOPLE)
    rng = np.random.default_rng(0)
    for images in (rng.random((PEOPLE, 112, 92)), np.full((PEOPLE, 112, 92), 0.5)):
        s = IndependentJudge.summary(judge.score(images, people))
        assert s["face_found"] == 0.0
        assert s["judge_top1"] <= 0.15
        # one image for everybody: the people's ranks are a permutation, lineup mean 1/5
        assert s["judge_lineup5"] < lineup_chance_bar(PEOPLE, PEOPLE)


def test_lineup_probability_is_exact_against_enumeration() -> None:
    rng = np.random.default_rng(3)
    k = 8
    d = rng.random((30, k))
    d[:5, 2] = d[:5, 3]  # ties: a tied person is not farther, so the right one loses
    y = rng.integers(0, k, 30)
    got = lineup_probability(d, y, size=5)
    for i in range(30):
        others = [j for j in range(k) if j != y[i]]
        lineups = list(combinations(others, 4))
        wins = sum(all(d[i, j] > d[i, y[i]] for j in group) for group in lineups)
        assert got[i] == pytest.approx(wins / len(lineups))
    assert np.array_equal(ranks(d, y), 1 + (d < d[np.arange(30), y][:, None]).sum(axis=1))


def test_chance_bar_is_above_chance_and_tightens_with_people() -> None:
    assert 0.2 < lineup_chance_bar(40, 40) < lineup_chance_bar(40, 10) < 1.0
    # a uniform rank averages exactly 1/size: the bar's centre
    k = 40
    p = lineup_probability(np.tile(np.arange(k, dtype=float), (k, 1)), np.arange(k))
    assert p.mean() == pytest.approx(0.2)


def test_face_judge_carries_the_independent_fields(faces: ImageDataset) -> None:
    x, y = faces.test()
    plain = FaceJudge.fit(faces, None, seed=0)
    rec = plain.score(x[:2], y[:2])[0]
    assert all(rec[k] is None for k in JUDGE_FIELDS)  # not measured, never "not recovered"
    assert "held_out_photo_blurred_3px" not in plain.reference_points(y[:2], seed=0)


def test_an_unenrolled_judge_refuses(judge: IndependentJudge) -> None:
    with pytest.raises(DataError, match="not enrolled"):
        IndependentJudge(judge.recogniser).score(np.zeros((1, 112, 92)), np.array([0]))
    with pytest.raises(DataError, match="enrolled on images"):
        judge.score(np.zeros((1, 8, 8)), np.array([0]))
    with pytest.raises(DataError, match="labels must be in"):
        judge.score(np.zeros((1, 112, 92)), np.array([PEOPLE]))
    with pytest.raises(DataError, match="no photo to enrol"):
        IndependentJudge.enrol(np.zeros((2, 112, 92)), np.array([0, 0]), 2)


def test_blur_scale_orders_recognisability(face_judge: FaceJudge) -> None:
    people = np.arange(PEOPLE)
    refs = face_judge.reference_points(people, seed=0)
    dist = {
        name: FaceJudge.summary(face_judge.score(refs[name], people))["judge_distance"]
        for name in ("held_out_photo", "held_out_photo_blurred_2px", "held_out_photo_blurred_6px")
    }
    assert dist["held_out_photo"] < dist["held_out_photo_blurred_2px"]
    assert dist["held_out_photo_blurred_2px"] < dist["held_out_photo_blurred_6px"]
