"""Image loaders: shapes, names, split determinism and every bad-input path."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mlinvert.data import load
from mlinvert.data.base import ImageDataset, close_pairs, copy_groups, per_class_split
from mlinvert.errors import DataError

from .conftest import write_image


def load_images(spec: str, *, seed: int = 0, size: tuple[int, int] | None = None) -> ImageDataset:
    """``load`` for a spec that names an image set (a survey here is a failed test)."""
    ds = load(spec, seed=seed, size=size)
    assert isinstance(ds, ImageDataset), spec
    return ds


def test_att_shapes_names_and_split(att_path: Path) -> None:
    ds = load_images(f"att:{att_path}", seed=0)
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
    a, b, c = (load_images(f"att:{att_path}", seed=s) for s in (3, 3, 4))
    assert np.array_equal(a.split.train, b.split.train)
    assert np.array_equal(a.split.test, b.split.test)
    assert not np.array_equal(a.split.train, c.split.train)
    assert a.split.to_dict()["seed"] == 3


def test_fake_att_and_subset(fake_att: Path) -> None:
    ds = load_images(f"att:{fake_att}", seed=1)
    assert ds.images.shape == (30, 112, 92) and ds.n_classes == 3
    sub = ds.subset(2)
    assert sub.n_classes == 2 and set(sub.labels.tolist()) == {0, 1}
    assert sub.split.train.size + sub.split.test.size == 20
    assert np.array_equal(sub.images[sub.split.train], ds.images[ds.split.train][:14])


def test_folder_converts_and_resizes(fake_folder: Path) -> None:
    ds = load_images(f"folder:{fake_folder}", seed=0, size=(32, 24))
    assert ds.images.shape == (8, 32, 24) and ds.class_names == ("alice", "bob")
    assert ds.images.dtype == np.float32 and ds.images.max() <= 1.0
    assert ds.split.train.size + ds.split.test.size == 8
    assert all(np.any(ds.labels[ds.split.test] == c) for c in (0, 1))


def test_digits_is_embedded() -> None:
    ds = load_images("digits", seed=0)
    assert ds.images.shape == (1797, 8, 8) and ds.n_classes == 10
    assert ds.class_names == tuple(str(i) for i in range(10))
    other = load_images("digits", seed=1)
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


def test_folder_people_with_too_few_photos_are_named_in_one_line(fake_folder: Path) -> None:
    """One photo, or two copies of one photo, cannot give one private and one held-out
    photo: every such person is named in one refusal, before any training."""
    write_image(fake_folder / "carol" / "0.png", (10, 10))
    write_image(fake_folder / "dave" / "0.png", (30, 30), seed=5)
    shutil.copy(fake_folder / "dave" / "0.png", fake_folder / "dave" / "1.png")
    (fake_folder / "erin").mkdir()
    with pytest.raises(DataError) as err:
        load(f"folder:{fake_folder}")
    line = str(err.value)
    assert "\n" not in line and "3 of 5 people" in line
    assert "carol (1), dave (1), erin (0)" in line and "move those folders out" in line


def test_folder_with_one_person_is_refused(tmp_path: Path) -> None:
    for k in range(3):
        write_image(tmp_path / "alice" / f"{k}.png", (20, 20), seed=k)
    (tmp_path / ".thumbnails").mkdir()  # hidden: not a second person
    with pytest.raises(DataError, match="holds 1 identity sub-folders; at least 2"):
        load(f"folder:{tmp_path}")


def test_unreadable_images_in_folder_are_all_named_in_one_line(fake_folder: Path) -> None:
    (fake_folder / "bob" / "9.jpg").write_bytes(b"\xff\xd8garbage")
    (fake_folder / "alice" / "8.png").write_bytes(b"")
    with pytest.raises(DataError) as err:
        load(f"folder:{fake_folder}")
    line = str(err.value)
    assert "\n" not in line and "cannot read images under" in line
    assert "alice/8.png" in line and "bob/9.jpg" in line and "Replace or remove them" in line


def test_hidden_and_other_files_are_skipped(fake_folder: Path) -> None:
    (fake_folder / "alice" / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (fake_folder / "bob" / "._0.png").write_bytes(b"\x00\x05\x16\x07")  # macOS twin
    (fake_folder / "bob" / "notes.txt").write_text("photographed 2019")
    (fake_folder / ".cache").mkdir()
    write_image(fake_folder / ".cache" / "0.png", (10, 10))
    ds = load_images(f"folder:{fake_folder}")
    assert ds.class_names == ("alice", "bob") and ds.images.shape[0] == 8
    assert ds.meta["ignored_files"] == 1


def test_folder_fits_other_sizes_by_the_stated_policy(tmp_path: Path) -> None:
    """A 20x40 photo (white left half, black right) fitted to 20x20: crop keeps the
    middle (half white), pad keeps it all and fills with its mean grey, stretch squeezes.
    The spec records size and fit, so the card's spec loads the same images again."""
    means = []
    for i, name in enumerate(("a", "b")):
        for k in range(2):
            px = np.zeros((20, 40), dtype=np.uint8)
            px[:, :20] = 255
            px[:4] = 40 + 50 * (2 * i + k)  # four distinct photos
            means.append(px.mean())
            (tmp_path / name).mkdir(exist_ok=True)
            Image.fromarray(px, mode="L").save(tmp_path / name / f"{k}.png")
    got = {}
    for fit in ("crop", "pad", "stretch"):
        ds = load_images(f"folder:{tmp_path}?size=20,20&fit={fit}")
        assert ds.spec == f"folder:{tmp_path}?size=20,20&fit={fit}"
        assert ds.meta["fit"] == fit and ds.meta["size"] == [20, 20]
        assert np.array_equal(load_images(ds.spec).images, ds.images)
        got[fit] = ds.images[0]
    crop, pad, stretch = got["crop"], got["pad"], got["stretch"]
    assert crop[10, 2] == 1.0 and crop[10, 17] == 0.0  # the middle 20 columns
    assert pad[2, 10] == pytest.approx(round(means[0]) / 255)  # margin: mean grey
    assert pad[10, 2] == 1.0 and pad[10, 17] == 0.0
    assert stretch[10, 2] == 1.0 and stretch[10, 17] == 0.0
    assert load(f"folder:{tmp_path}?size=20,20", size=(20, 20)).spec.endswith("fit=crop")
    for spec, words in [
        (f"folder:{tmp_path}?size=20x", "not H,W in pixels"),
        (f"folder:{tmp_path}?fit=zoom", "unknown fit 'zoom'"),
        (f"folder:{tmp_path}?colour=1", "unknown folder option 'colour'"),
        (f"folder:{tmp_path}?size=0,20", "positive sides"),
    ]:
        with pytest.raises(DataError, match=words):
            load(spec)
    with pytest.raises(DataError, match="give the size once"):
        load(f"folder:{tmp_path}?size=20,20", size=(10, 10))


def test_folder_reads_colour_transparency_16_bit_and_animations(tmp_path: Path) -> None:
    person = tmp_path / "p"
    person.mkdir()
    Image.new("RGB", (8, 8), (255, 0, 0)).save(person / "red.jpg", quality=100)
    Image.new("RGBA", (8, 8), (0, 0, 0, 0)).save(person / "clear.png")  # over white
    Image.fromarray(np.full((8, 8), 65535, dtype=np.uint16)).save(person / "deep.png")
    frames = [Image.new("L", (8, 8), v) for v in (40, 200)]
    frames[0].save(person / "anim.gif", save_all=True, append_images=frames[1:])
    Image.new("P", (8, 8), 0).save(person / "pal.bmp")
    write_image(tmp_path / "q" / "0.pgm", (8, 8), seed=1)
    write_image(tmp_path / "q" / "1.pgm", (8, 8), seed=2)
    ds = load_images(f"folder:{tmp_path}?size=8,8")
    by_file = dict(zip(sorted(f.name for f in person.iterdir()), ds.images[:5], strict=True))
    assert by_file["red.jpg"].mean() == pytest.approx(76 / 255, abs=3 / 255)  # luma of red
    assert by_file["clear.png"].min() == 1.0
    assert by_file["deep.png"].min() == 1.0  # 16-bit white, not clipped or wrapped
    assert by_file["anim.gif"].max() == pytest.approx(40 / 255, abs=1 / 255)  # first frame
    assert by_file["pal.bmp"].max() == 0.0


def test_copies_are_found_reported_and_kept_on_one_side(fake_att: Path) -> None:
    """An exact copy (the same file twice) and a near-exact one (re-saved with a few grey
    levels of noise) are found at load, listed in meta, and every seed's split keeps each
    photo's copies together; distinct photos are never taken for copies."""
    shutil.copy(fake_att / "s1" / "3.pgm", fake_att / "s1" / "11.pgm")
    px = np.asarray(Image.open(fake_att / "s2" / "5.pgm"), dtype=np.int16)
    noise = np.random.default_rng(0).integers(-3, 4, size=px.shape)
    Image.fromarray(np.clip(px + noise, 0, 255).astype(np.uint8)).save(fake_att / "s2" / "12.pgm")
    for seed in range(6):
        ds = load_images(f"att:{fake_att}", seed=seed)
        copies = ds.meta["copies"]
        assert [c["files"] for c in copies] == [
            ["s1/3.pgm", "s1/11.pgm"],
            ["s2/5.pgm", "s2/12.pgm"],
        ]
        assert [c["exact"] for c in copies] == [True, False]
        train = set(ds.split.train.tolist())
        for group in copy_groups(ds.images):
            assert len({i in train for i in group}) == 1
        assert "2 copies of another photo kept on its side" in ds.split.rule
        assert all(np.any(ds.labels[ds.split.test] == c) for c in range(3))


def test_split_without_copies_is_the_plain_row_split(att_path: Path) -> None:
    ds = load_images(f"att:{att_path}", seed=3)
    assert "copies" not in ds.meta  # AT&T's 400 photos are all distinct
    plain = per_class_split(ds.labels, 7, 3)
    assert np.array_equal(plain.train, ds.split.train) and plain.rule == ds.split.rule
    # two copies of one photo among a class of three: the split still holds one out
    labels = np.array([0, 0, 0, 1, 1])
    for seed in range(8):
        split = per_class_split(labels, 0.7, seed, copies=[[0, 2]])
        assert (0 in split.train) == (2 in split.train)
        assert set(labels[split.test].tolist()) == {0, 1}


def test_close_pairs_within_and_across_sets() -> None:
    rng = np.random.default_rng(1)
    a = rng.random((6, 30, 20))
    b = np.stack([a[4] + 0.01 * rng.standard_normal((30, 20)), rng.random((30, 20))])
    assert close_pairs(a).tolist() == []
    assert close_pairs(a, b).tolist() == [[4, 0]]
    assert close_pairs(np.concatenate([a, a[:1]])).tolist() == [[0, 6]]
