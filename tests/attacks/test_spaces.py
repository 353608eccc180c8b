"""PCAPrior's detail frequencies and typical-set ball; the cosine step schedule."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from mlinvert.attacks import MIFace, MIFaceConfig
from mlinvert.attacks.gradients import Exact
from mlinvert.attacks.spaces import PCAPrior, augment_faces
from mlinvert.defenses import Predictor
from mlinvert.errors import ConfigError
from mlinvert.oracle import WhiteBoxOracle


def _aux(digits: Any, label: int) -> np.ndarray:
    return np.asarray(digits.images[digits.labels != label][:200], dtype=np.float64)


def test_detail_adds_whitened_dct_frequencies(digits: Any) -> None:
    aux = _aux(digits, 3)
    plain = PCAPrior(aux, 10).bind((8, 8))
    rich = PCAPrior(aux, 10, detail=4).bind((8, 8))
    assert rich.dim == plain.dim + 16
    # the first columns are the same eigenfaces; the detail columns are scaled by the
    # auxiliary images' spread of each frequency, so a unit step is a typical deviation
    assert rich._basis is not None and plain._basis is not None
    assert np.allclose(rich._basis[:, :10], plain._basis)
    coef = (aux.reshape(len(aux), -1) - aux.reshape(len(aux), -1).mean(0)) @ rich._basis[:, 10:]
    norms = np.linalg.norm(rich._basis[:, 10:], axis=0)
    assert np.allclose(coef.std(axis=0), norms**2, rtol=1e-6)
    # a digit the eigenfaces of OTHER digits cannot draw is drawn better with detail
    x = digits.images[digits.labels == 3][:20].astype(np.float64)
    err_plain = np.mean((plain.decode(plain.encode(x)) - x) ** 2)
    err_rich = np.mean((rich.decode(rich.encode(x)) - x) ** 2)
    assert err_rich < 0.7 * err_plain


def test_augment_adds_mirrored_and_shifted_faces() -> None:
    """Six images per aux face (itself, mirror, 4 shifts with edges repeated); the prior
    built from them draws the mirror image of an aux face exactly, the plain one cannot."""
    faces = np.arange(2 * 6 * 5, dtype=np.float64).reshape(2, 6, 5) / 60.0
    more = augment_faces(faces, shift=2)
    assert more.shape == (12, 6, 5)
    assert np.array_equal(more[:2], faces)
    assert np.array_equal(more[2:4], faces[:, :, ::-1])
    up, down, left, right = more[4:6], more[6:8], more[8:10], more[10:12]
    assert np.array_equal(up[:, 2:], faces[:, :-2])  # content moved down by 2 ...
    assert np.array_equal(up[:, :2], np.repeat(faces[:, :1], 2, axis=1))  # ... edge repeated
    assert np.array_equal(down[:, :-2], faces[:, 2:])
    assert np.array_equal(left[:, :, 2:], faces[:, :, :-2])
    assert np.array_equal(right[:, :, :-2], faces[:, :, 2:])

    aux = np.random.default_rng(0).uniform(0.0, 1.0, size=(30, 20, 20))  # 180 < 400 px
    mirrored = aux[:5, :, ::-1]
    errors = {}
    for augment in (False, True):
        space = PCAPrior(aux, 400, augment=augment, radius=None).bind((20, 20))
        errors[augment] = np.mean((space.raw(space.encode(mirrored)) - mirrored) ** 2)
    assert errors[True] < 1e-12 < 1e-3 < errors[False]
    assert PCAPrior(aux, 10).to_dict()["augment"] is False


@pytest.mark.parametrize("shape", [(30, 50), (50, 30)])
def test_principal_axes_match_the_svd_for_few_or_many_images(shape: tuple[int, int]) -> None:
    from mlinvert.attacks.spaces import _principal_axes

    x = np.random.default_rng(0).normal(size=shape)
    s, vt = _principal_axes(x)
    _, s_ref, vt_ref = np.linalg.svd(x, full_matrices=False)
    assert np.allclose(s, s_ref[: len(s)])
    assert np.allclose(np.abs(np.sum(vt * vt_ref[: len(s)], axis=1)), 1.0)


def test_ball_keeps_points_typical_and_sets_no_extra_prior(digits: Any) -> None:
    space = PCAPrior(_aux(digits, 3), 12, radius=0.5).bind((8, 8))
    far = np.full(space.dim, 10.0)
    assert np.linalg.norm(space.project(far)) == pytest.approx(0.5 * np.sqrt(space.dim))
    near = np.full(space.dim, 0.01)
    assert np.array_equal(space.project(near), near)
    assert space.default_prior_weight == 0.0
    assert PCAPrior(_aux(digits, 3), 12, radius=None).default_prior_weight > 0
    with pytest.raises(ConfigError, match="radius"):
        PCAPrior(_aux(digits, 3), 12, radius=0.0)
    with pytest.raises(ConfigError, match="detail"):
        PCAPrior(_aux(digits, 3), 12, detail=-1)


def test_improved_attack_stays_in_the_ball(digits: Any, toy_softmax: Any) -> None:
    space = PCAPrior(_aux(digits, 4), 12, radius=0.8)
    result = MIFace(MIFaceConfig.improved(max_iter=60), gradient=Exact(), space=space).run(
        WhiteBoxOracle(Predictor(toy_softmax, name="toy")), 4, seed=0
    )
    bound = space.bind((8, 8))
    z = bound.encode(result.reconstructions.astype(np.float64))[0]
    assert np.linalg.norm(z) <= 0.8 * np.sqrt(bound.dim) * 1.05  # decode clips pixels
    assert result.per_label[0]["predicted"] == 4


def test_cosine_schedule_anneals_to_zero() -> None:
    """Adam on a constant gradient moves ``step`` per iteration; cosine shrinks it to 0."""
    from mlinvert.attacks.miface import _Optim

    for horizon, first, last in ((None, 0.1, 0.1), (50, 0.1, 0.0)):
        opt = _Optim("adam", 0.1, 0.9, np.zeros(3), np.zeros(3), horizon=horizon)
        z = np.zeros(3)
        steps = []
        for _ in range(51):
            new = opt.update(z, np.ones(3))
            steps.append(float(np.abs(new - z).max()))
            z = new
        assert steps[0] == pytest.approx(first, abs=1e-6)
        assert steps[-1] == pytest.approx(last, abs=1e-6)
        assert steps[25] == pytest.approx(
            0.1 if horizon is None else 0.05 * (1 + np.cos(np.pi / 2)), abs=1e-3
        )
    with pytest.raises(ConfigError, match="schedule"):
        MIFaceConfig(schedule="linear")  # type: ignore[arg-type]
