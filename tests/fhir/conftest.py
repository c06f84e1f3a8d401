"""Test setup of the FHIR tests: make ``tests/fhir_server.py`` importable."""

from __future__ import annotations

import sys
from pathlib import Path

# tests/fhir_server.py lives one level up; appended (not prepended) so nothing can shadow site-packages.
_TESTS = str(Path(__file__).resolve().parents[1])
if _TESTS not in sys.path:
    sys.path.append(_TESTS)
