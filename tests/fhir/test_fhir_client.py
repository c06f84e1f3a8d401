"""FhirClient against a real HTTP server on loopback (tests/fhir_server.py), and bundle files."""

from __future__ import annotations

import json
import logging
import socket
from typing import Any

import pytest
from fhir_fixtures import ISSUED, SR_UID, make_result, make_source

from dermnode.errors import DeliveryError, OutputError
from dermnode.fhir.bundle import build_bundle
from dermnode.fhir.client import FhirClient, redact
from dermnode.settings import FhirSettings
from fhir_server import FhirTestServer

TOKEN = "s3cr3t-token-value"


def _bundle(kind: str = "calibrated") -> dict[str, Any]:
    ds = make_source()
    return build_bundle(
        ds,
        make_result(ds, kind),
        sr_sop_instance_uid=SR_UID,
        seg_sop_instance_uid=None,
        overlay_png=None,
        settings=FhirSettings(version="R4"),
        issued=ISSUED,
    )


@pytest.fixture
def server() -> Any:
    srv = FhirTestServer().start()
    try:
        yield srv
    finally:
        srv.stop()


def _client(url: str, **kw: Any) -> FhirClient:
    return FhirClient(FhirSettings(base_url=url, bearer_token=TOKEN, timeout_s=kw.pop("timeout_s", 5.0), **kw))


@pytest.mark.timeout(60)
def test_delivery_and_retry_never_duplicates(server: FhirTestServer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    server.token = TOKEN
    client = _client(server.url)
    bundle = _bundle()
    answer = client.post_bundle(bundle)
    assert answer["type"] == "transaction-response"
    assert all(e["response"]["status"].startswith("201") for e in answer["entry"])
    (req,) = server.requests
    assert req.method == "POST" and req.path == "/fhir"
    assert req.headers["Content-Type"].startswith("application/fhir+json")
    assert req.headers["Authorization"] == f"Bearer {TOKEN}"
    assert req.json == bundle
    counts = {t: server.count(t) for t in ("Patient", "Device", "ImagingStudy", "Observation", "DiagnosticReport")}
    assert counts == {"Patient": 1, "Device": 1, "ImagingStudy": 1, "Observation": 9, "DiagnosticReport": 1}
    (dr,) = server.resources["DiagnosticReport"].values()
    assert dr["subject"]["reference"].startswith("Patient/")  # urn:uuid resolved by the server
    # A retry (same bundle) matches every conditional create: nothing new is stored.
    again = client.post_bundle(bundle)
    assert all(e["response"]["status"].startswith("200") for e in again["entry"])
    assert {t: server.count(t) for t in counts} == counts
    assert TOKEN not in caplog.text


@pytest.mark.timeout(60)
def test_transient_5xx_then_recovers(server: FhirTestServer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    server.mode, server.fail_times = "503", 1
    client = _client(server.url)
    with pytest.raises(DeliveryError) as info:
        client.post_bundle(_bundle())
    assert info.value.permanent is False and "503" in str(info.value)
    assert client.post_bundle(_bundle())["type"] == "transaction-response"
    assert TOKEN not in caplog.text and TOKEN not in str(info.value)


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("status", "permanent"), [("400", True), ("422", True), ("408", False), ("429", False)])
def test_4xx_is_permanent_except_408_429(server: FhirTestServer, status: str, permanent: bool) -> None:
    server.mode = status
    with pytest.raises(DeliveryError) as info:
        _client(server.url).post_bundle(_bundle())
    assert info.value.permanent is permanent
    assert "test server says" in str(info.value)  # OperationOutcome diagnostics surfaced


@pytest.mark.timeout(60)
def test_wrong_token_is_permanent_and_not_logged(server: FhirTestServer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    server.token = "another-token"
    with pytest.raises(DeliveryError) as info:
        _client(server.url).post_bundle(_bundle())
    assert info.value.permanent is True and "401" in str(info.value)
    assert TOKEN not in caplog.text


@pytest.mark.timeout(60)
def test_server_down_is_transient(server: FhirTestServer) -> None:
    url = server.url
    server.mode = "down"
    with pytest.raises(DeliveryError) as info:
        _client(url).post_bundle(_bundle())
    assert info.value.permanent is False
    server.mode = "ok"  # back on the same port
    assert _client(url).post_bundle(_bundle())["type"] == "transaction-response"


@pytest.mark.timeout(60)
def test_connection_refused_is_transient() -> None:
    with socket.socket() as s:  # a port with nobody listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(DeliveryError) as info:
        _client(f"http://127.0.0.1:{port}/fhir").post_bundle(_bundle())
    assert info.value.permanent is False


@pytest.mark.timeout(60)
def test_timeout_is_transient(server: FhirTestServer) -> None:
    server.mode, server.slow_s = "slow", 1.5
    with pytest.raises(DeliveryError) as info:
        _client(server.url, timeout_s=0.3).post_bundle(_bundle())
    assert info.value.permanent is False


def test_client_needs_http_url() -> None:
    with pytest.raises(OutputError):
        FhirClient(FhirSettings(base_url=""))


def test_redact() -> None:
    assert redact(f"Bearer {TOKEN} x", TOKEN) == "Bearer *** x"
    assert redact("abc", "") == "abc"


def test_patient_identifier_echoed_by_the_server_is_masked(caplog: pytest.LogCaptureFixture) -> None:
    """Servers echo a failing conditional create (Patient?identifier=...|<Patient ID>): keep it out of logs."""
    import io
    import urllib.error

    from dermnode.fhir.client import patient_identifiers

    bundle = _bundle()
    (patient_id,) = patient_identifiers(bundle)
    body = json.dumps({
        "resourceType": "OperationOutcome",
        "issue": [{"severity": "error", "code": "processing",
                   "diagnostics": f"conditional create Patient?identifier=urn:x|{patient_id} matched 2 resources"}],
    }).encode()
    exc = urllib.error.HTTPError("http://ehr.example/fhir", 412, "Precondition Failed", None,  # type: ignore[arg-type]
                                 io.BytesIO(body))
    caplog.set_level(logging.DEBUG)
    err = _client("http://ehr.example/fhir")._http_error(exc, patient_identifiers(bundle))
    assert "matched 2 resources" in str(err) and "***" in str(err)
    assert patient_id not in str(err) and patient_id not in caplog.text



def test_patient_identifier_is_masked_in_its_escaped_and_encoded_forms() -> None:
    """ifNoneExist sends the ID FHIR-escaped and percent-encoded; a server echoes that form back."""
    import io
    import urllib.error

    patient_id = "MRN 0042/7,x"
    echoed = "Patient?identifier=urn:mrn|MRN%200042/7%5C%2Cx matched 2; raw MRN 0042/7\\,x; plain MRN 0042/7,x"
    body = json.dumps({"resourceType": "OperationOutcome",
                       "issue": [{"severity": "error", "code": "processing", "diagnostics": echoed}]}).encode()
    exc = urllib.error.HTTPError("http://ehr.example/fhir", 412, "Precondition Failed", None,  # type: ignore[arg-type]
                                 io.BytesIO(body))
    text = str(_client("http://ehr.example/fhir")._http_error(exc, [patient_id]))
    assert "0042" not in text and "matched 2" in text
