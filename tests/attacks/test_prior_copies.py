"""The eigenface prior drops auxiliary photos that are copies of private ones (exact or
near-exact) and counts them, instead of refusing the attack; an explicit --aux that
holds a private photo is still refused (check_disjoint)."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from mlinvert.attacks.spaces import PCAPrior, check_disjoint, coincident
from mlinvert.errors import ConfigError


def _photos(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).random((n, 12, 10))


def test_copies_of_private_photos_are_dropped_and_counted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    private = _photos(4, 0)
    others = _photos(6, 1)
    near = np.clip(private[2] + 0.005 * np.random.default_rng(2).standard_normal((12, 10)), 0, 1)
    aux = np.concatenate([others[:3], private[:1], others[3:], near[None]])
    assert coincident(aux, private).tolist() == [False] * 3 + [True] + [False] * 3 + [True]
    with caplog.at_level(logging.WARNING):
        space = PCAPrior(aux, 4, private=private, source="held-out photos").bind((12, 10))
    assert isinstance(space, PCAPrior)
    assert space.dropped == 2 and space.to_dict()["n_aux_dropped"] == 2
    assert space.to_dict()["n_aux"] == 8
    assert "dropped 2 of 8 auxiliary images (held-out photos)" in caplog.text
    # the prior is built from the six other photos alone: its mean face is theirs
    assert space._offset is not None
    np.testing.assert_allclose(space._offset, others.reshape(6, -1).mean(axis=0))
    bound = PCAPrior(others, 4, private=private).bind((12, 10))
    assert isinstance(bound, PCAPrior) and bound.dropped == 0


def test_too_few_photos_left_is_one_clear_error() -> None:
    private = _photos(3, 0)
    aux = np.concatenate([private, _photos(2, 1)])
    with pytest.raises(ConfigError, match=r"2 auxiliary images .* left after dropping 3"):
        PCAPrior(aux, 4, private=private).bind((12, 10))


def test_an_explicit_aux_set_with_a_private_photo_is_still_refused() -> None:
    private = _photos(3, 0)
    check_disjoint(_photos(4, 1), private)
    with pytest.raises(ConfigError, match="auxiliary image 1 coincides with private training"):
        check_disjoint(np.stack([_photos(1, 1)[0], private[2]]), private)
