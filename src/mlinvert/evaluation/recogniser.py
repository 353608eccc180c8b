"""The independent face judge: a pretrained face recogniser that never saw the people.

A reconstruction counts as a recovered face only if a face recogniser that was neither
built nor tuned here picks the right person. This module wraps dlib's face recognition
ResNet (Davis King, ``dlib_face_recognition_resnet_model_v1``: 99.38 % on LFW's
verification benchmark, trained on about 3 million faces of people unrelated to any
private data here), its frontal face detector (HOG) and its 5-point landmark predictor,
all shipped inside the PyPI wheel ``face-recognition-models`` and run offline.

How an image is judged (:class:`FaceRecogniser`):

1. grey in [0, 1] -> 8-bit, replicated to RGB;
2. dlib's frontal detector on the image upsampled twice; the largest face found is
   aligned with the 5-point predictor into a 150 px chip (``get_face_chip``);
   where no face is found, the whole image resized to 150x150 is embedded instead and
   ``face_found`` is False (on tightly cropped photos the detector can miss a real face
   that the recogniser still identifies, so a missing face is reported, not fatal);
3. the ResNet's 128-d descriptor.

:class:`IndependentJudge` enrols each person with the mean descriptor of their private
training photos (the auditor owns them) and scores an image of person ``c`` by the
Euclidean distances from its descriptor to every enrolled mean:

``judge_rank``
    1 + the number of people whose enrolled mean is strictly nearer than ``c``'s;
``judge_top1``, ``judge_top5``
    rank 1, rank <= 5;
``judge_lineup5``
    the exact probability, over every set of 4 other people, that ``c`` is nearer than
    all 4 (:func:`lineup_probability`; no sampling): 0.2 for an image that carries no
    identity, averaged over people;
``judge_distance``, ``judge_same_person``
    the distance to ``c``'s mean, and whether it is below dlib's published same-person
    threshold 0.6;
``face_found``
    whether the detector found a face.

Independence is a rule with a test (``tests/evaluation/test_independence.py``): no
attack, search space, prior or preset may import this module or dlib.
"""

from __future__ import annotations

import importlib.util
import threading
from dataclasses import dataclass
from functools import lru_cache
from math import comb, sqrt
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from mlinvert.data.images import to_uint8
from mlinvert.errors import ConfigError, DataError
from mlinvert.evaluation.descriptors import DescriptorCache, cache_folder, fingerprint, image_key

#: dlib's published same-person threshold on the descriptor distance.
SAME_PERSON_DISTANCE = 0.6
#: People in the automated lineup (the paper's human study used 5).
LINEUP_SIZE = 5
#: Side of the aligned face chip, and of the whole-image fallback, in pixels.
CHIP_SIZE = 150
#: How often the detector upsamples the image (AT&T faces are 92 px wide).
UPSAMPLE = 2
#: One-sided z of the "clearly above chance" lineup bar (about the 99.9th percentile).
CHANCE_Z = 3.0

#: Record fields this judge adds, in order.
JUDGE_FIELDS = (
    "face_found",
    "judge_rank",
    "judge_top1",
    "judge_top5",
    "judge_lineup5",
    "judge_distance",
    "judge_same_person",
)
#: Summary fields: rates of the booleans and means of the numbers.
JUDGE_RATE_FIELDS = ("face_found", "judge_top1", "judge_top5", "judge_same_person")
JUDGE_MEAN_FIELDS = ("judge_lineup5", "judge_distance", "judge_rank")

_FILES = {
    "recogniser": "dlib_face_recognition_resnet_model_v1.dat",
    "landmarks": "shape_predictor_5_face_landmarks.dat",
}

JUDGE_NAME = "dlib face recognition ResNet v1 (independent, pretrained; never saw these people)"


def model_files() -> dict[str, Path]:
    """Paths of dlib's model files inside the installed ``face-recognition-models`` wheel.

    The package's ``__init__`` needs ``pkg_resources`` (absent from new virtualenvs), so
    the files are found from the package's location without importing it.
    """
    spec = importlib.util.find_spec("face_recognition_models")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise ConfigError(
            "the independent face judge needs the PyPI packages 'dlib-bin' and "
            "'face-recognition-models' (pip install dlib-bin face-recognition-models); "
            "make test / make demo install them"
        )
    folder = Path(locations[0]) / "models"
    paths = {k: folder / name for k, name in _FILES.items()}
    missing = [str(p) for p in paths.values() if not p.is_file()]
    if missing:
        raise ConfigError(
            f"face-recognition-models is installed without its model files ({missing[0]}); "
            "reinstall it: pip install --force-reinstall face-recognition-models"
        )
    return paths


def _to_rgb(image: np.ndarray) -> np.ndarray:
    """Grey float image in [0, 1] -> contiguous uint8 RGB (h, w, 3)."""
    grey = to_uint8(image)
    return np.ascontiguousarray(np.repeat(grey[:, :, None], 3, axis=2))


class FaceRecogniser:
    """dlib's detector, 5-point aligner and face recognition ResNet, loaded once.

    ``embed`` is serialised by a lock: the audit may judge from several threads and
    dlib's objects are not documented as thread-safe.
    """

    def __init__(self) -> None:
        try:
            import dlib
        except ImportError as exc:  # pragma: no cover - dlib-bin is a dependency
            raise ConfigError(
                "the independent face judge needs dlib: pip install dlib-bin "
                "face-recognition-models"
            ) from exc
        files = model_files()
        self._dlib = dlib
        folder = cache_folder()
        self._cache = (
            None
            if folder is None
            else DescriptorCache(
                folder, fingerprint(files.values(), dlib.__version__, UPSAMPLE, CHIP_SIZE)
            )
        )
        self._detector = dlib.get_frontal_face_detector()
        self._landmarks = dlib.shape_predictor(str(files["landmarks"]))
        self._net = dlib.face_recognition_model_v1(str(files["recogniser"]))
        self._lock = threading.Lock()

    def embed_one(self, image: np.ndarray) -> tuple[np.ndarray, bool]:
        """The 128-d descriptor of one grey image in [0, 1], and whether a face was found."""
        rgb = _to_rgb(image)
        with self._lock:
            faces = list(self._detector(rgb, UPSAMPLE))
            if faces:
                box = max(faces, key=lambda r: r.width() * r.height())
                chip = self._dlib.get_face_chip(rgb, self._landmarks(rgb, box), size=CHIP_SIZE)
            else:
                chip = np.asarray(
                    Image.fromarray(rgb).resize((CHIP_SIZE, CHIP_SIZE), Image.Resampling.BILINEAR)
                )
            vec = self._net.compute_face_descriptor(np.ascontiguousarray(chip))
        return np.asarray(vec, dtype=np.float64), bool(faces)

    def embed(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Descriptors ``(n, 128)`` and ``face_found`` ``(n,)`` of grey images ``(n, h, w)``."""
        x = np.asarray(images)
        if x.ndim != 3:
            raise DataError(f"the face judge takes grey images (n, h, w), got shape {x.shape}")
        if x.shape[0] == 0:
            return np.zeros((0, 128)), np.zeros(0, dtype=bool)
        if not np.all(np.isfinite(x)):
            raise DataError("the face judge got images with NaN or infinite pixels")
        if self._cache is None:
            pairs = [self.embed_one(im) for im in x]
        else:  # opt-in: photos judged before are read back (evaluation/descriptors.py)
            keys = [image_key(to_uint8(im)) for im in x]
            known = self._cache.get(keys)
            fresh = {k: self.embed_one(im) for k, im in zip(keys, x, strict=True) if k not in known}
            self._cache.put(fresh)
            pairs = [known.get(k) or fresh[k] for k in keys]
        return np.stack([p[0] for p in pairs]), np.asarray([p[1] for p in pairs], dtype=bool)


@lru_cache(maxsize=1)
def shared_recogniser() -> FaceRecogniser:
    """One :class:`FaceRecogniser` per process (loading the networks takes ~1 s)."""
    return FaceRecogniser()


def ranks(distances: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """1 + the number of people strictly nearer than the right one, per row."""
    d = np.asarray(distances, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    own = d[np.arange(y.size), y]
    return 1 + np.sum(d < own[:, None], axis=1)


def lineup_probability(
    distances: np.ndarray, labels: np.ndarray, size: int = LINEUP_SIZE
) -> np.ndarray:
    """Exact chance that the right person wins a ``size``-way lineup, per row.

    Over every set of ``size - 1`` other people drawn from the ``K - 1`` others, the
    right person wins when all of them are strictly farther: ``C(m, size-1) /
    C(K-1, size-1)`` where ``m`` counts the others farther than the right person. A
    lineup larger than the number of people shrinks to all of them.
    """
    d = np.asarray(distances, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    k = d.shape[1]
    if k < 2:
        raise DataError("a lineup needs at least 2 people")
    s = min(size, k)
    own = d[np.arange(y.size), y]
    farther = np.sum(d > own[:, None], axis=1)
    total = comb(k - 1, s - 1)
    return np.asarray([comb(int(m), s - 1) / total for m in farther], dtype=np.float64)


def lineup_chance_bar(n_classes: int, n_people: int, size: int = LINEUP_SIZE) -> float:
    """The mean lineup probability that is clearly above chance for ``n_people`` people.

    Under "no identity" each person's rank is uniform over 1..K, so the lineup
    probability has mean ``1/size`` and a known variance; the bar is that mean plus
    :data:`CHANCE_Z` standard errors of a mean over ``n_people`` (about the 99.9th
    percentile, one-sided). 40 people of 40: 0.33; 10 of 10: 0.50.
    """
    if n_classes < 2 or n_people < 1:
        raise ConfigError("the lineup bar needs at least 2 people and 1 attacked person")
    s = min(size, n_classes)
    total = comb(n_classes - 1, s - 1)
    p = np.asarray([comb(n_classes - r, s - 1) / total for r in range(1, n_classes + 1)])
    return float(p.mean() + CHANCE_Z * sqrt(float(p.var()) / n_people))


@dataclass(frozen=True)
class _Enrolment:
    means: np.ndarray  # (K, 128)
    shape: tuple[int, int]


class IndependentJudge:
    """Ranks a reconstruction among all enrolled people with :class:`FaceRecogniser`."""

    def __init__(self, recogniser: FaceRecogniser | None = None) -> None:
        self.recogniser = recogniser or shared_recogniser()
        self._enrolment: _Enrolment | None = None
        self.enrol_face_found_: float | None = None

    @classmethod
    def enrol(
        cls,
        images: np.ndarray,
        labels: np.ndarray,
        n_classes: int,
        *,
        recogniser: FaceRecogniser | None = None,
    ) -> IndependentJudge:
        """Enrol every person ``0..n_classes-1`` with the mean descriptor of their
        (private) photos ``images`` ``(n, h, w)``."""
        judge = cls(recogniser)
        x = np.asarray(images)
        y = np.asarray(labels, dtype=np.int64)
        if x.ndim != 3 or y.shape != (x.shape[0],):
            raise DataError(
                f"enrolment takes images (n, h, w) and n labels, got {x.shape} and {y.shape}"
            )
        missing = sorted(set(range(n_classes)) - set(y.tolist()))
        if missing:
            raise DataError(
                f"people {missing[:5]} have no photo to enrol; the judge needs one per person"
            )
        vecs, found = judge.recogniser.embed(x)
        means = np.stack([vecs[y == c].mean(axis=0) for c in range(n_classes)])
        judge._enrolment = _Enrolment(means=means, shape=(int(x.shape[1]), int(x.shape[2])))
        judge.enrol_face_found_ = float(found.mean())
        return judge

    @property
    def n_classes(self) -> int:
        """How many people are enrolled."""
        return int(self._enrolled().means.shape[0])

    def _enrolled(self) -> _Enrolment:
        if self._enrolment is None:
            raise DataError("IndependentJudge is not enrolled; create it with enrol(...)")
        return self._enrolment

    def distances(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Distances ``(n, K)`` to every enrolled mean, and ``face_found`` ``(n,)``."""
        enrolment = self._enrolled()
        x = np.asarray(images)
        if x.ndim != 3 or tuple(x.shape[1:]) != enrolment.shape:
            raise DataError(
                f"the judge was enrolled on images {enrolment.shape}, got {tuple(x.shape[1:])}"
            )
        vecs, found = self.recogniser.embed(x)
        d = np.linalg.norm(vecs[:, None, :] - enrolment.means[None, :, :], axis=2)
        return d, found

    def score(self, images: np.ndarray, labels: np.ndarray) -> list[dict[str, Any]]:
        """One record per image with the fields of :data:`JUDGE_FIELDS`."""
        y = np.asarray(labels, dtype=np.int64)
        k = self.n_classes
        if y.ndim != 1 or y.size != np.asarray(images).shape[0]:
            raise DataError(f"one label per image expected, got {y.shape} labels")
        if y.size and (y.min() < 0 or y.max() >= k):
            raise DataError(f"labels must be in 0..{k - 1}, got {y.min()}..{y.max()}")
        if y.size == 0:
            return []
        d, found = self.distances(images)
        rank = ranks(d, y)
        lineup = lineup_probability(d, y)
        own = d[np.arange(y.size), y]
        return [
            {
                "face_found": bool(found[i]),
                "judge_rank": int(rank[i]),
                "judge_top1": bool(rank[i] == 1),
                "judge_top5": bool(rank[i] <= 5),
                "judge_lineup5": float(lineup[i]),
                "judge_distance": float(own[i]),
                "judge_same_person": bool(own[i] < SAME_PERSON_DISTANCE),
            }
            for i in range(y.size)
        ]

    @staticmethod
    def summary(records: list[dict[str, Any]]) -> dict[str, Any]:
        """Rates of the boolean fields and means of the numeric ones (None if absent)."""
        out: dict[str, Any] = {"n": len(records)}
        for key in JUDGE_RATE_FIELDS + JUDGE_MEAN_FIELDS:
            vals = [float(r[key]) for r in records if r.get(key) is not None]
            out[key] = float(np.mean(vals)) if vals else None
        return out
