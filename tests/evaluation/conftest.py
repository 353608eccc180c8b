"""Fixtures for the face-evaluation tests: AT&T (skipped if absent), a quick
evaluation model (PCA + logistic regression, with ``embed`` = the PCA projection)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression
from threadpoolctl import threadpool_limits

from mlinvert.data import ImageDataset, load_att
from mlinvert.evaluation import REFERENCE_NAMES, FaceJudge


class QuickEvalModel:
    """A small stand-in evaluation model: PCA features and a logistic regression."""

    def __init__(self, images: np.ndarray, labels: np.ndarray) -> None:
        flat = images.reshape(images.shape[0], -1)
        with threadpool_limits(limits=1, user_api="blas"):  # fast on a busy machine
            self.pca = PCA(n_components=min(40, flat.shape[0] - 1), random_state=0).fit(flat)
            self.clf = LogisticRegression(max_iter=500).fit(self.pca.transform(flat), labels)
        self.classes_ = self.clf.classes_

    def embed(self, X: np.ndarray) -> np.ndarray:
        return np.asarray(self.pca.transform(X.reshape(X.shape[0], -1)))

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        return np.asarray(self.clf.predict_proba(self.embed(X)))


@pytest.fixture(scope="session")
def att(att_path: Path) -> ImageDataset:
    return load_att(att_path, seed=0)


@pytest.fixture(scope="session")
def att_eval_model(att: ImageDataset) -> QuickEvalModel:
    return QuickEvalModel(*att.train())


@pytest.fixture(scope="session")
def att_judge(att: ImageDataset, att_eval_model: QuickEvalModel) -> FaceJudge:
    return FaceJudge.fit(att, att_eval_model, seed=0)


@pytest.fixture(scope="session")
def att_reference_summaries(att_judge: FaceJudge) -> dict[str, dict[str, Any]]:
    """Summaries of the four reference points for every AT&T identity (twice each)."""
    labels = np.repeat(np.arange(40), 2)
    refs = att_judge.reference_points(labels, seed=1)
    assert set(refs) == set(REFERENCE_NAMES)
    return {name: att_judge.summary(att_judge.score(imgs, labels)) for name, imgs in refs.items()}


@pytest.fixture(scope="session")
def digits_eval_model(digits: ImageDataset) -> QuickEvalModel:
    return QuickEvalModel(*digits.train())
