"""Fixtures of the decision-tree tests: the shared surveys (skipped when absent)."""

from __future__ import annotations

from pathlib import Path

import pytest

from mlinvert.data.surveys import SurveyDataset, load_fair, load_gss, load_steak

ROOT = Path(__file__).resolve().parents[2]
STEAK = ROOT.parent / "shared" / "data" / "steak-survey"
GSS = ROOT.parent / "shared" / "data" / "gss"


@pytest.fixture(scope="session")
def steak_path() -> Path:
    """Folder of the steak survey."""
    if not (STEAK / "steak-risk-survey.csv").is_file():
        pytest.skip("../shared/data/steak-survey not present")
    return STEAK


@pytest.fixture(scope="session")
def gss_path() -> Path:
    """Folder of the GSS extract."""
    if not (GSS / "GSS_15235.csv").is_file():
        pytest.skip("../shared/data/gss not present")
    return GSS


@pytest.fixture(scope="session")
def steak(steak_path: Path) -> SurveyDataset:
    """The steak survey, seed 0."""
    return load_steak(str(steak_path), seed=0)


@pytest.fixture(scope="session")
def gss(gss_path: Path) -> SurveyDataset:
    """The GSS extract."""
    return load_gss(str(gss_path), seed=0)


@pytest.fixture(scope="session")
def fair() -> SurveyDataset:
    """The embedded Fair affairs survey, seed 0."""
    return load_fair(seed=0)
