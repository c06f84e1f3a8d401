"""Fixtures of the DICOM output tests (builders and validators are in dicom_output_cases.py)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest
from dicom_output_cases import CASES, Case, make_case

from dermnode.vocabulary import AnalysisStatus


@pytest.fixture(params=sorted(CASES))
def analysed_case(request: pytest.FixtureRequest) -> Case:
    spacing, classified = CASES[request.param]
    return make_case(spacing, classified)


@pytest.fixture
def not_analysable_case() -> Case:
    return make_case(status=AnalysisStatus.NOT_ANALYSABLE)


@pytest.fixture
def save(tmp_path: Path) -> Callable[[pydicom.Dataset, str], Path]:
    def _save(ds: pydicom.Dataset, name: str) -> Path:
        path = tmp_path / name
        ds.save_as(path, enforce_file_format=True)
        return path

    return _save
