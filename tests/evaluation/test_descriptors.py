"""The opt-in cache of the judge's face descriptors: off unless named, private on disk,
the same numbers as dlib's, keyed by the networks, and never a failed measurement."""

from __future__ import annotations

import logging
import stat
from pathlib import Path

import numpy as np
import pytest

from mlinvert.data import ImageDataset
from mlinvert.evaluation.descriptors import CACHE_ENV, FILE_NAME, DescriptorCache, image_key
from mlinvert.evaluation.recogniser import FaceRecogniser


@pytest.fixture(scope="module")
def photos(att: ImageDataset) -> np.ndarray:
    return att.train()[0][:3]


def _no_dlib(recogniser: FaceRecogniser, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(image: np.ndarray) -> tuple[np.ndarray, bool]:
        raise AssertionError("dlib ran for a photo the cache holds")

    monkeypatch.setattr(recogniser, "embed_one", refuse)


def test_a_cached_photo_reads_back_dlib_s_own_numbers(
    photos: np.ndarray, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    first = FaceRecogniser()
    computed = first.embed(photos)
    file = tmp_path / "cache" / FILE_NAME
    assert stat.S_IMODE(file.stat().st_mode) == 0o600
    assert stat.S_IMODE(file.parent.stat().st_mode) == 0o700
    again = FaceRecogniser()
    _no_dlib(again, monkeypatch)
    cached = again.embed(photos)
    assert np.array_equal(cached[0], computed[0]) and np.array_equal(cached[1], computed[1])
    # the photo dlib never saw is computed, and equals what no cache gives
    monkeypatch.delenv(CACHE_ENV)
    plain = FaceRecogniser()
    assert plain._cache is None
    assert np.array_equal(plain.embed(photos[::-1])[0], computed[0][::-1])


def test_off_unless_named(
    photos: np.ndarray, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(CACHE_ENV, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    FaceRecogniser().embed(photos[:1])
    assert list(tmp_path.rglob("*")) == []  # nothing written anywhere


def test_other_networks_never_read_an_entry(tmp_path: Path) -> None:
    key = image_key(np.zeros((4, 4)))
    DescriptorCache(tmp_path, "net-a").put({key: (np.ones(128), True)})
    assert DescriptorCache(tmp_path, "net-b").get([key]) == {}
    (vec, found) = DescriptorCache(tmp_path, "net-a").get([key])[key]
    assert np.array_equal(vec, np.ones(128)) and found


def test_a_broken_cache_is_skipped_with_one_warning(
    photos: np.ndarray,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    (tmp_path / FILE_NAME).write_bytes(b"not a database at all" * 100)
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    with caplog.at_level(logging.WARNING, logger="mlinvert.evaluation.descriptors"):
        vecs, found = FaceRecogniser().embed(photos)
    monkeypatch.delenv(CACHE_ENV)
    plain = FaceRecogniser().embed(photos)
    assert np.array_equal(vecs, plain[0]) and np.array_equal(found, plain[1])
    warnings = [r for r in caplog.records if "is not used" in r.getMessage()]
    assert len(warnings) == 1
