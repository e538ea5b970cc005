"""Shared fixtures. Tests import helpers as modules of the `tests` package
(`from tests.dist_utils import spawn`); pytest puts the repository root on sys.path."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
GOLDEN_PREPROCESS = REPO_ROOT / "tests" / "data" / "golden" / "preprocess"


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT
