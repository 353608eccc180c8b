"""An opt-in disk cache of the independent judge's face descriptors.

A descriptor is a pure function of an image's 8-bit pixels and dlib's networks, so an
audit that judges the same photos again (enrolling the private photos, the held-out
reference photos) can read it back instead of running dlib: about 0.13 s a photo, 35 s
to enrol AT&T's 280 private photos on this project's 2-core machine. Reconstructions
are new images and are never found in it.

**Off unless asked for**: ``MLINVERT_DESCRIPTOR_CACHE=DIR`` turns it on. Descriptors of
the private photos are biometric data about the very people an audit protects (face
embeddings can themselves be inverted), so they are kept only where the user says, in
``DIR/face-descriptors.sqlite``, created readable by its owner alone (0600, folder
0700); delete the file to forget them. The test suite points it at a temporary folder
of its own.

Entries are keyed by the SHA-256 of the 8-bit image and its shape, under a fingerprint
of dlib's version, its model files, the detector's upsampling and the chip size, so a
different network never reads an old descriptor. A cache that cannot be opened, read or
written is logged once and skipped: it never fails or changes a measurement.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

#: The environment variable naming the cache folder (unset or empty: no cache).
CACHE_ENV = "MLINVERT_DESCRIPTOR_CACHE"
FILE_NAME = "face-descriptors.sqlite"

Entry = tuple[np.ndarray, bool]


def image_key(image: np.ndarray) -> str:
    """The cache key of one 8-bit image: SHA-256 of its shape and bytes."""
    u8 = np.ascontiguousarray(image, dtype=np.uint8)
    return hashlib.sha256(repr(u8.shape).encode() + u8.tobytes()).hexdigest()


def fingerprint(files: Iterable[Path], *settings: object) -> str:
    """What a descriptor depends on besides the image: the model files' bytes and the
    settings (dlib's version, upsampling, chip size)."""
    digest = hashlib.sha256(repr(settings).encode())
    for path in files:
        digest.update(hashlib.sha256(Path(path).read_bytes()).digest())
    return digest.hexdigest()[:32]


def cache_folder() -> Path | None:
    """The folder ``$MLINVERT_DESCRIPTOR_CACHE`` names, or None when it is not set."""
    folder = os.environ.get(CACHE_ENV, "").strip()
    return Path(folder).expanduser() if folder else None


class DescriptorCache:
    """Descriptors by (fingerprint, image key) in one SQLite file (safe across processes)."""

    def __init__(self, folder: Path, fingerprint: str) -> None:
        self.path = Path(folder) / FILE_NAME
        self.fingerprint = fingerprint
        self._failed = False

    @contextlib.contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        """One connection: committed when the block ends cleanly, always closed."""
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        if not self.path.exists():  # created private before SQLite writes to it
            os.close(os.open(self.path, os.O_CREAT | os.O_WRONLY, 0o600))
        db = sqlite3.connect(self.path, timeout=30.0)
        try:
            with db:
                db.execute(
                    "CREATE TABLE IF NOT EXISTS descriptors (fingerprint TEXT, key TEXT, "
                    "vector BLOB, face_found INTEGER, PRIMARY KEY (fingerprint, key))"
                )
                yield db
        finally:
            db.close()

    def _skip(self, exc: Exception) -> None:
        if not self._failed:
            log.warning(
                "the face descriptor cache %s is not used (%s); descriptors are computed",
                self.path,
                exc,
            )
        self._failed = True

    def get(self, keys: Sequence[str]) -> dict[str, Entry]:
        """The cached entries among ``keys`` (missing ones are absent)."""
        if self._failed or not keys:
            return {}
        found: dict[str, Entry] = {}
        try:
            with self._connect() as db:
                for start in range(0, len(keys), 500):
                    part = list(keys[start : start + 500])
                    marks = ",".join("?" * len(part))
                    rows = db.execute(
                        "SELECT key, vector, face_found FROM descriptors "
                        f"WHERE fingerprint = ? AND key IN ({marks})",
                        [self.fingerprint, *part],
                    )
                    for key, blob, face in rows:
                        vec = np.frombuffer(blob, dtype="<f8")
                        if vec.shape == (128,):
                            found[key] = (vec.astype(np.float64), bool(face))
        except (sqlite3.Error, OSError) as exc:
            self._skip(exc)
            return {}
        return found

    def put(self, entries: dict[str, Entry]) -> None:
        """Store ``entries`` (one transaction)."""
        if self._failed or not entries:
            return
        rows = [
            (self.fingerprint, key, np.asarray(vec, dtype="<f8").tobytes(), int(face))
            for key, (vec, face) in entries.items()
        ]
        try:
            with self._connect() as db:
                db.executemany("INSERT OR IGNORE INTO descriptors VALUES (?, ?, ?, ?)", rows)
        except (sqlite3.Error, OSError) as exc:
            self._skip(exc)
