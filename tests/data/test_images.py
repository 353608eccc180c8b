"""Image loaders: shapes, names, split determinism and every bad-input path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from mlinvert.data import load
from mlinvert.errors import DataError

from .conftest import write_image


def test_att_shapes_names_and_split(att_path: Path) -> None:
    ds = load(f"att:{att_path}", seed=0)
    assert ds.images.shape == (400, 112, 92)
    assert ds.images.dtype == np.float32 and ds.labels.dtype == np.int64
    assert ds.images.min() >= 0.0 and ds.images.max() <= 1.0 and ds.images.std() > 0.1
    assert ds.class_names == tuple(f"s{i}" for i in range(1, 41))  # natural order
    assert (ds.split.train.size, ds.split.test.size) == (280, 120)
    assert np.intersect1d(ds.split.train, ds.split.test).size == 0
    assert set(np.bincount(ds.labels[ds.split.train]).tolist()) == {7}
    assert set(np.bincount(ds.labels[ds.split.test]).tolist()) == {3}
    x, y = ds.train()
    assert x.shape == (280, 112, 92) and y.shape == (280,)


def test_att_split_is_deterministic_per_seed(att_path: Path) -> None:
    a, b, c = (load(f"att:{att_path}", seed=s) for s in (3, 3, 4))
    assert np.array_equal(a.split.train, b.split.train)
    assert np.array_equal(a.split.test, b.split.test)
    assert not np.array_equal(a.split.train, c.split.train)
    assert a.split.to_dict()["seed"] == 3


def test_fake_att_and_subset(fake_att: Path) -> None:
    ds = load(f"att:{fake_att}", seed=1)
    assert ds.images.shape == (30, 112, 92) and ds.n_classes == 3
    sub = ds.subset(2)
    assert sub.n_classes == 2 and set(sub.labels.tolist()) == {0, 1}
    assert sub.split.train.size + sub.split.test.size == 20
    assert np.array_equal(sub.images[sub.split.train], ds.images[ds.split.train][:14])


def test_folder_converts_and_resizes(fake_folder: Path) -> None:
    ds = load(f"folder:{fake_folder}", seed=0, size=(32, 24))
    assert ds.images.shape == (8, 32, 24) and ds.class_names == ("alice", "bob")
    assert ds.images.dtype == np.float32 and ds.images.max() <= 1.0
    assert ds.split.train.size + ds.split.test.size == 8
    assert all(np.any(ds.labels[ds.split.test] == c) for c in (0, 1))


def test_digits_is_embedded() -> None:
    ds = load("digits", seed=0)
    assert ds.images.shape == (1797, 8, 8) and ds.n_classes == 10
    assert ds.class_names == tuple(str(i) for i in range(10))
    other = load("digits", seed=1)
    assert not np.array_equal(ds.split.train, other.split.train)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("att", "needs a path"),
        ("folder:", "needs a path"),
        ("att:/no/such/folder", "does not exist"),
        ("imagenet:/x", "unknown data spec"),
    ],
)
def test_bad_specs(spec: str, message: str) -> None:
    with pytest.raises(DataError, match=message):
        load(spec)


def test_file_instead_of_folder(tmp_path: Path) -> None:
    f = tmp_path / "faces.zip"
    f.write_bytes(b"PK")
    with pytest.raises(DataError, match="is a file"):
        load(f"att:{f}")


def test_wrong_layout_without_identity_folders(tmp_path: Path) -> None:
    write_image(tmp_path / "1.pgm", (112, 92))
    with pytest.raises(DataError, match="identity sub-folders"):
        load(f"att:{tmp_path}")


def test_att_identity_without_pgm(fake_att: Path) -> None:
    for f in (fake_att / "s2").iterdir():
        f.unlink()
    write_image(fake_att / "s2" / "1.png", (112, 92))
    with pytest.raises(DataError, match=r"s2 has no \.pgm"):
        load(f"att:{fake_att}")


def test_unreadable_image_names_the_file(fake_att: Path) -> None:
    bad = fake_att / "s3" / "4.pgm"
    bad.write_bytes(b"not an image at all")
    with pytest.raises(DataError, match=r"cannot read image .*4\.pgm"):
        load(f"att:{fake_att}")


def test_differently_sized_att_image(fake_att: Path) -> None:
    write_image(fake_att / "s1" / "7.pgm", (100, 80))
    with pytest.raises(DataError, match=r"7\.pgm is 80x100 px.*folder:PATH"):
        load(f"att:{fake_att}")


def test_folder_identity_with_one_image(fake_folder: Path) -> None:
    write_image(fake_folder / "carol" / "0.png", (10, 10))
    with pytest.raises(DataError, match="carol holds 1 images"):
        load(f"folder:{fake_folder}")


def test_unreadable_image_in_folder(fake_folder: Path) -> None:
    (fake_folder / "bob" / "9.jpg").write_bytes(b"\xff\xd8garbage")
    with pytest.raises(DataError, match=r"9\.jpg"):
        load(f"folder:{fake_folder}")
