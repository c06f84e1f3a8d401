"""The web console with FastAPI's TestClient: pages, upload through the spool and queue, refusals, auth, CSRF,
PHI and the audit log."""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from fastapi.testclient import TestClient
from webhelpers import (
    PASSWORD,
    TOKEN,
    auth_settings,
    base_settings,
    csrf_of,
    dicom_bytes,
    job_uids,
    lesion_png,
    login,
    make_client,
    upload,
)

from dermnode.dicom_io.uids import DERMOSCOPIC_PHOTOGRAPHY_IMAGE_STORAGE
from dermnode.settings import Settings
from dermnode.web.auth import SESSION_COOKIE
from dermnode.web.state import ConsoleState
from dermnode.workqueue.db import database_path
from dermnode.workqueue.jobs import JobQueue
from dermnode.workqueue.outbox import Outbox

# -- upload: the same spool and queue as C-STORE --------------------------------------------------------------


def test_photo_upload_is_wrapped_spooled_queued_and_lands_on_its_result_page(
    local_client: TestClient, tmp_path: Path
) -> None:
    r = upload(local_client, [("lesion.png", lesion_png(), "image/png")], pixel_spacing="0.02")
    assert r.status_code == 303
    uid = r.headers["location"].removeprefix("/results/")
    queue = JobQueue(database_path(tmp_path / "var"))
    job = queue.get(uid)
    assert job is not None and job["state"] == "pending" and job["calling_aet"] == "WEB-CONSOLE"
    spooled = Path(job["path"])
    assert spooled.parent.parent == tmp_path / "var" / "spool"  # the Store SCP's spool, fan-out folder
    ds = pydicom.dcmread(spooled)
    assert ds.SOPClassUID == DERMOSCOPIC_PHOTOGRAPHY_IMAGE_STORAGE and ds.Modality == "DMS"
    assert ds.PatientID == "PAT-0042" and [float(v) for v in ds.PixelSpacing] == [0.02, 0.02]
    assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian  # as `dermnode wrap` (no --jpeg)
    page = local_client.get(r.headers["location"])
    assert page.status_code == 200 and "Waiting for the analysis" in page.text and 'data-waiting="1"' in page.text
    assert local_client.get(f"/results/{uid}/state").json() == {"status": "queued", "result": False}


def test_dicom_upload_is_stored_as_sent_duplicates_once_and_a_dead_job_is_requeued(
    local_client: TestClient, tmp_path: Path
) -> None:
    data = dicom_bytes("DCM-PAT-7")
    r = upload(local_client, [("image.dcm", data, "application/dicom")], patient_id="")
    assert r.status_code == 303
    uid = r.headers["location"].removeprefix("/results/")
    queue = JobQueue(database_path(tmp_path / "var"), max_attempts=1)
    row = queue.get(uid)
    assert row is not None and Path(row["path"]).read_bytes() == data
    again = upload(local_client, [("image.dcm", data, "application/dicom"), ("copy.dcm", data, "application/dicom")],
                   patient_id="")
    assert again.status_code == 200 and again.text.count("already received") == 2
    job = queue.claim("w")
    assert job is not None
    queue.fail(job, "boom", permanent=True)
    assert queue.state(uid) == "dead"
    upload(local_client, [("image.dcm", data, "application/dicom")], patient_id="")
    assert queue.state(uid) == "pending"  # as a C-STORE of a dead-lettered instance


@pytest.mark.parametrize(
    ("name", "data", "patient_id", "spacing", "reason"),
    [
        ("notes.txt", b"this is not an image", "P1", "", "not an image"),
        ("fake.png", b"\x89PNG\r\n\x1a\n garbage", "P1", "", "not an image"),
        ("lesion.png", None, "", "", "a patient ID is required"),
        ("lesion.png", None, "P1", "big", "not a number"),
        ("lesion.png", None, "P1", "50", "outside"),
        ("lesion.png", None, "A\\B", "", "backslash"),
        ("image.dcm", b"DCM", "OTHER-PATIENT", "", "not the Patient ID"),
        ("empty.png", b"", "P1", "", "the file is empty"),
    ],
)
def test_refused_uploads_say_why_and_store_nothing(
    local_client: TestClient, tmp_path: Path, name: str, data: bytes | None, patient_id: str, spacing: str,
    reason: str,
) -> None:
    payload = lesion_png() if data is None else dicom_bytes() if data == b"DCM" else data
    r = upload(local_client, [(name, payload, "application/octet-stream")], patient_id=patient_id,
               pixel_spacing=spacing)
    assert r.status_code == 422
    assert reason in r.text and 'id="refused"' in r.text
    assert JobQueue(database_path(tmp_path / "var")).counts()["pending"] == 0
    assert not list((tmp_path / "var" / "spool").glob("*/*.dcm"))


def test_a_file_over_the_size_limit_is_refused_and_a_request_over_the_cap_gets_413(tmp_path: Path) -> None:
    settings = base_settings(tmp_path / "var", max_upload_mb=1, max_upload_files=2)
    with make_client(settings) as client:
        big = b"\xff\xd8\xff" + b"0" * (1_048_576 + 10)
        r = upload(client, [("huge.jpg", big, "image/jpeg")])
        assert r.status_code == 413 and "too large: 1.0 MB, the limit is 1 MB (web.max_upload_mb)" in r.text
        capped = upload(client, [(f"f{i}.jpg", big, "image/jpeg") for i in range(3)])
        assert capped.status_code == 413 and "Upload refused: too large" in capped.text
    assert JobQueue(database_path(tmp_path / "var")).counts()["pending"] == 0


def test_several_files_report_each_outcome(local_client: TestClient) -> None:
    r = upload(local_client, [("a.png", lesion_png(), "image/png"), ("b.txt", b"no", "text/plain")])
    assert r.status_code == 200
    assert 'id="accepted"' in r.text and 'id="refused"' in r.text and "b.txt" in r.text


# -- worklist, result and status pages -----------------------------------------------------------------------


def test_worklist_lists_newest_first_with_status_band_deliveries_and_filters(analysed_root: Path) -> None:
    uids = job_uids(analysed_root)
    assert set(uids) == {"analysed", "not_analysable", "queued"}
    with make_client(base_settings(analysed_root)) as client:
        page = client.get("/")
        assert page.status_code == 200
        rows = re.findall(r'<tr data-sop-instance-uid="([^"]+)" data-status="([^"]+)"', page.text)
        assert rows == [(uids["queued"], "queued"), (uids["not_analysable"], "not_analysable"),
                        (uids["analysed"], "analysed")]
        assert "PAT-0042" in page.text and "PAT-0099" in page.text
        assert "PACS main: dead-lettered" in page.text
        assert page.headers["x-dermnode-live"] == "1"  # a job is queued: the page refreshes itself
        assert 'data-live="1"' in page.text

        def shown(**query: str) -> list[str]:
            text = client.get("/", params=query).text
            return re.findall(r'<tr data-sop-instance-uid="([^"]+)"', text)

        assert shown(status="analysed") == [uids["analysed"]]
        assert shown(status="not_analysable") == [uids["not_analysable"]]
        assert shown(band="benign") + shown(band="indeterminate") + shown(band="malignant") == [uids["analysed"]]
        assert shown(q="pat-0099") == [uids["queued"]]
        assert shown(q="nobody") == []
        fragment = client.get("/", headers={"X-Fragment": "rows"})
        assert "<html" not in fragment.text and uids["queued"] in fragment.text


def test_worklist_pagination(analysed_root: Path) -> None:
    with make_client(base_settings(analysed_root, page_size=2)) as client:
        first = client.get("/").text
        assert "Page 1 of 2" in first and first.count("<tr data-sop") == 2
        second = client.get("/", params={"page": 2}).text
        assert "Page 2 of 2" in second and second.count("<tr data-sop") == 1


def test_result_page_shows_everything_the_issue_asks_for(analysed_root: Path) -> None:
    uid = job_uids(analysed_root)["analysed"]
    models = json.loads((analysed_root / "results" / uid / "result.json").read_text())["models"]
    with make_client(base_settings(analysed_root)) as client:
        text = client.get(f"/results/{uid}").text
        for needle in (
            *(f"{m['name']} {m['version']}" for m in models),
            'id="toggle-outline"', 'id="zoom-in"', "/image/source.png", "/image/overlay.png",
            "Calibrated from the image&#39;s Pixel Spacing: 0.02 × 0.02 mm per pixel", " mm²", " mm<",
            'id="melanoma-probability"', 'id="band-meaning"', 'id="class-probabilities"', "Melanocytic nevus",
            "Passed: a usable dermoscopy image", "sha256 ",
            "Decision support only", "files/seg.dcm", "files/sr.dcm", "files/diagnostic-report.json",
            "files/source.dcm", "association rejected by PACS", "Replay this delivery", "PAT-0042",
        ):
            assert needle in text, needle
        assert text.count("<svg class=\"bar\"") == 9
        assert 'alt="Source image with the lesion outline found by dermnode"' in text
        assert 'alt="Source dermoscopy image without annotation"' in text
        for img in ("source.png", "overlay.png"):
            r = client.get(f"/results/{uid}/image/{img}")
            assert r.status_code == 200 and r.content[:8] == b"\x89PNG\r\n\x1a\n"
        seg = client.get(f"/results/{uid}/files/seg.dcm")
        assert seg.status_code == 200 and "attachment" in seg.headers["content-disposition"]
        assert seg.headers["cache-control"] == "no-store"
        assert client.get(f"/results/{uid}/files/../../dermnode.db").status_code == 404
        assert client.get("/results/not-a-uid").status_code == 404
        assert client.get("/results/1.2.3.4").status_code == 404


def test_result_page_offers_the_presentation_state_and_only_an_existing_key_image(analysed_root: Path) -> None:
    """pr.dcm (written by default) is offered and served as DICOM like SEG/SR; key-image.dcm (output.burned_in_image,
    off here) is not written, so it is neither offered nor served."""
    uid = job_uids(analysed_root)["analysed"]
    assert (analysed_root / "results" / uid / "pr.dcm").is_file()
    assert not (analysed_root / "results" / uid / "key-image.dcm").exists()
    with make_client(base_settings(analysed_root)) as client:
        text = client.get(f"/results/{uid}").text
        assert f'href="/results/{uid}/files/pr.dcm" download id="dl-pr-dcm"' in text
        assert "DICOM presentation state" in text
        assert "files/key-image.dcm" not in text and 'id="dl-key-image-dcm"' not in text
        pr = client.get(f"/results/{uid}/files/pr.dcm")
        assert pr.status_code == 200 and pr.headers["content-type"] == "application/dicom"
        assert f'filename="{uid}-pr.dcm"' in pr.headers["content-disposition"]
        assert pr.content == (analysed_root / "results" / uid / "pr.dcm").read_bytes()
        assert pydicom.dcmread(io.BytesIO(pr.content)).Modality == "PR"
        assert client.get(f"/results/{uid}/files/key-image.dcm").status_code == 404


def test_a_refused_image_shows_the_gate_reason(analysed_root: Path) -> None:
    uid = job_uids(analysed_root)["not_analysable"]
    with make_client(base_settings(analysed_root)) as client:
        text = client.get(f"/results/{uid}").text
        assert "Refused — colours are not those of skin; not a dermoscopy image." in text
        assert "No classification" in text and "files/seg.dcm" not in text


def test_uncalibrated_measurements_say_pixels_only(tmp_path: Path) -> None:
    from dermnode.web.app import _routes  # noqa: F401 - the page is rendered from result.json alone

    root = tmp_path / "var"
    uid = "1.2.826.0.1.3680043.10.99.77"
    (root / "results" / uid).mkdir(parents=True)
    (root / "results" / uid / "result.json").write_text(
        '{"status": "analysed", "models": [], "pixel_spacing_mm": null, "quality": {"usable": true},'
        ' "measurements": {"area_px": 1200, "area_mm2": null, "perimeter_px": 130, "perimeter_mm": null,'
        ' "max_diameter_px": 44, "max_diameter_mm": null, "asymmetry": 0.1, "asymmetry_axes": 1,'
        ' "border_irregularity": 1.1, "border_score": 2, "colors": ["light brown"], "tds": null},'
        ' "classification": {"melanoma_probability": 0.5, "band": "indeterminate", "band_meaning": "",'
        ' "diagnosis_probabilities": {"MEL": 0.5, "NV": 0.5}}}'
    )
    with make_client(base_settings(root)) as client:
        text = client.get(f"/results/{uid}").text
    assert "Pixels only: no calibration" in text and "1200 px²" in text and "44 px" in text
    assert "cannot tell" in text  # the indeterminate band's meaning


def test_a_finished_job_whose_results_were_pruned_says_so(tmp_path: Path, analysed_root: Path) -> None:
    import shutil

    root = tmp_path / "copy"
    shutil.copytree(analysed_root, root)
    uid = job_uids(root)["analysed"]
    shutil.rmtree(root / "results" / uid)
    with make_client(base_settings(root)) as client:
        text = client.get(f"/results/{uid}").text
    assert "Result files not kept" in text and 'data-waiting="0"' in text


def test_status_page_shows_the_numbers_of_dermnode_status(analysed_root: Path) -> None:
    with make_client(base_settings(analysed_root)) as client:
        text = client.get("/status").text
    counts = ConsoleState(analysed_root, Settings().delivery).counts()
    assert counts["jobs"]["done"] == 2 and counts["deliveries"]["dead_letter"] == 1
    assert re.search(r"<th scope=\"row\">done</th><td class=\"num\">2</td>", text)
    assert re.search(r"<th scope=\"row\">dead letter</th><td class=\"num\">1</td>", text)
    assert "/healthz" in text


def test_admin_replays_a_dead_lettered_delivery_as_dermnode_replay_does(tmp_path: Path, analysed_root: Path) -> None:
    import shutil

    root = tmp_path / "copy"
    shutil.copytree(analysed_root, root)
    uid = job_uids(root)["analysed"]
    outbox = Outbox(database_path(root), Settings().delivery)
    assert outbox.counts()["dead_letter"] == 1
    with make_client(auth_settings(root)) as client:
        login(client, "bob")  # a user, not an admin
        page = client.get(f"/results/{uid}").text
        assert "An administrator can replay it" in page and "Replay this delivery" not in page
        letter = JobQueue(database_path(root)).dead_letters("delivery")[0]["id"]
        token = csrf_of(client, f"/results/{uid}")
        r = client.post(f"/results/{uid}/replay", data={"csrf_token": token, "dead_letter": str(letter)})
        assert r.status_code == 403 and outbox.counts()["dead_letter"] == 1
    with make_client(auth_settings(root)) as client:
        login(client, "alice")
        token = csrf_of(client, f"/results/{uid}")
        r = client.post(f"/results/{uid}/replay", data={"csrf_token": token, "dead_letter": str(letter)},
                        follow_redirects=False)
        assert r.status_code == 303 and r.headers["location"].endswith("?replayed=1")
        assert outbox.counts()["dead_letter"] == 0 and outbox.counts()["pending"] == 1
        assert "1 item re-queued" in client.get(r.headers["location"]).text
        again = client.post(f"/results/{uid}/replay", data={"csrf_token": token, "dead_letter": str(letter)},
                            follow_redirects=False)
        assert again.headers["location"].endswith("?replayed=0")  # replayed already: nothing happens


# -- access, CSRF, PHI, audit --------------------------------------------------------------------------------


def test_every_post_route_refuses_a_missing_or_wrong_csrf_token(local_client: TestClient) -> None:
    routes = [r for r in local_client.app.app.routes if "POST" in getattr(r, "methods", set())]  # type: ignore[attr-defined]
    paths = sorted(r.path.replace("{uid}", "1.2.3") for r in routes)
    assert paths == ["/login", "/logout", "/results/1.2.3/replay", "/upload"]
    csrf_of(local_client)  # a session exists
    for path in paths:
        for data in ({}, {"csrf_token": "forged"}):
            r = local_client.post(path, data=data, follow_redirects=False)
            assert r.status_code == 403, (path, data, r.status_code)
            assert "CSRF" in r.text


def test_a_cross_origin_post_is_refused_even_with_a_token(local_client: TestClient) -> None:
    token = csrf_of(local_client)
    r = local_client.post("/upload", data={"csrf_token": token}, headers={"Origin": "http://evil.example"},
                          files=[("files", ("a.png", lesion_png(), "image/png"))])
    assert r.status_code == 403


def test_loopback_console_answers_only_to_loopback_host_names(local_client: TestClient) -> None:
    assert local_client.get("/", headers={"Host": "localhost:8080"}).status_code == 200
    assert local_client.get("/", headers={"Host": "attacker.example"}).status_code == 400  # DNS rebinding


def test_beyond_loopback_nothing_but_the_login_page_without_authentication(analysed_root: Path) -> None:
    uid = job_uids(analysed_root)["analysed"]
    with make_client(auth_settings(analysed_root), base_url="http://dermnode.hospital.example") as client:
        for path in ("/", f"/results/{uid}", "/upload", "/status", f"/results/{uid}/state"):
            r = client.get(path, headers={"Accept": "text/html"}, follow_redirects=False)
            assert r.status_code == 303 and r.headers["location"].startswith("/login?next=")
            assert "PAT-0042" not in r.text
        for path in (f"/results/{uid}/files/seg.dcm", f"/results/{uid}/image/source.png", f"/results/{uid}/state"):
            r = client.get(path, follow_redirects=False)
            assert r.status_code == 401 and r.content == b"authentication required"
        login_page = client.get(f"/login?next=/results/{uid}")
        assert login_page.status_code == 200 and "PAT-0042" not in login_page.text and uid in login_page.text
        r = client.post(f"/results/{uid}/replay", data={}, follow_redirects=False)
        assert r.status_code == 401
        assert client.get("/static/console.css").status_code == 200


def test_login_logout_and_cookie_attributes(analysed_root: Path) -> None:
    with make_client(auth_settings(analysed_root, secure_cookies=True),
                     base_url="https://dermnode.hospital.example") as client:
        token = csrf_of(client, "/login")
        bad = client.post("/login", data={"csrf_token": token, "username": "alice", "password": "wrong"})
        assert bad.status_code == 401 and "Wrong user name or password" in bad.text
        good = client.post("/login", data={"csrf_token": token, "username": "alice", "password": PASSWORD,
                                           "next": "https://evil.example/"}, follow_redirects=False)
        assert good.status_code == 303 and good.headers["location"] == "/"  # no open redirect
        cookie = good.headers["set-cookie"]
        assert cookie.startswith(f"{SESSION_COOKIE}=")
        for attribute in ("HttpOnly", "Secure", "SameSite=strict", "Path=/"):
            assert attribute.lower() in cookie.lower(), attribute
        assert "PAT-0042" in client.get("/").text
        new_token = csrf_of(client, "/")
        assert new_token != token  # a new session (and token) after login: no session fixation
        client.post("/logout", data={"csrf_token": new_token})
        assert client.get("/", headers={"Accept": "text/html"}, follow_redirects=False).status_code == 303


def test_repeated_failed_logins_pause_the_name(analysed_root: Path) -> None:
    with make_client(auth_settings(analysed_root)) as client:
        token = csrf_of(client, "/login")
        codes = [client.post("/login", data={"csrf_token": token, "username": "bob", "password": "x"}).status_code
                 for _ in range(6)]
        assert codes == [401] * 5 + [429]


def test_bearer_token_needs_no_cookie_or_csrf_and_a_wrong_one_is_refused(analysed_root: Path) -> None:
    with make_client(auth_settings(analysed_root)) as client:
        ok = client.get("/status", headers={"Authorization": f"Bearer {TOKEN}"})
        assert ok.status_code == 200 and "set-cookie" not in ok.headers
        bad = client.get("/status", headers={"Authorization": "Bearer nope"})
        assert bad.status_code == 401 and bad.headers["www-authenticate"] == "Bearer"
        posted = client.post("/upload", headers={"Authorization": f"Bearer {TOKEN}"},
                             data={"patient_id": "P"}, files=[("files", ("a.txt", b"x", "text/plain"))])
        assert posted.status_code == 422 and "not an image" in posted.text


def test_security_headers(local_client: TestClient) -> None:
    r = local_client.get("/")
    assert "script-src 'self'" in r.headers["content-security-policy"]
    assert "frame-ancestors 'none'" in r.headers["content-security-policy"]
    assert r.headers["x-content-type-options"] == "nosniff" and r.headers["cache-control"] == "no-store"
    cookie = r.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie


def test_audit_line_per_result_viewed_and_no_phi_at_info(analysed_root: Path, caplog: pytest.LogCaptureFixture) -> None:
    uid = job_uids(analysed_root)["analysed"]
    caplog.set_level(logging.DEBUG)
    with make_client(auth_settings(analysed_root)) as client:
        login(client, "alice")
        client.get(f"/results/{uid}")
        client.get(f"/results/{uid}/files/seg.dcm")
        client.get("/", params={"q": "PAT-0042"})
        upload(client, [("lesion.png", lesion_png(), "image/png")], patient_id="PAT-SECRET-1")
    audit = [r.getMessage() for r in caplog.records if r.name == "dermnode.audit"]
    assert f"web: alice viewed the result of sop_instance={uid}" in audit
    assert f"web: alice downloaded seg.dcm of sop_instance={uid}" in audit
    assert any(m.startswith("web: alice (admin) logged in") for m in audit)
    # the server's records (httpx logs the test client's own request lines)
    info = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO and not r.name.startswith("httpx")]
    for phi in ("PAT-0042", "PAT-SECRET-1"):
        assert not [m for m in info if phi in m], phi


def test_the_login_page_of_an_unknown_next_never_reflects_markup(analysed_root: Path) -> None:
    with make_client(auth_settings(analysed_root)) as client:
        text = client.get('/login?next=/"><script>alert(1)</script>').text
    assert "<script>alert(1)" not in text


# -- review fixes: chunked oversized uploads, odd cookies, unwritable disks, the login throttle ----------------


def _multipart_chunks(token: str, boundary: str, megabytes: int) -> Iterator[bytes]:
    yield (f'--{boundary}\r\nContent-Disposition: form-data; name="csrf_token"\r\n\r\n{token}\r\n'
           f'--{boundary}\r\nContent-Disposition: form-data; name="patient_id"\r\n\r\nPAT-0042\r\n'
           f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="huge.jpg"\r\n'
           "Content-Type: image/jpeg\r\n\r\n").encode()
    for _ in range(megabytes):
        yield b"0" * 1_048_576
    yield f"\r\n--{boundary}--\r\n".encode()


def test_an_oversized_chunked_upload_without_content_length_gets_the_413_page(tmp_path: Path) -> None:
    settings = base_settings(tmp_path / "var", max_upload_mb=1, max_upload_files=1)  # request cap: 2 MB
    with make_client(settings) as client:
        token = csrf_of(client)
        boundary = "dermnode-test-boundary"
        r = client.post("/upload", content=_multipart_chunks(token, boundary, 5),
                        headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
                        follow_redirects=False)
        assert "content-length" not in {k.lower() for k in r.request.headers}
        assert r.status_code == 413 and "Upload refused: too large" in r.text
        assert "Traceback" not in r.text
        assert client.get("/status").status_code == 200  # the console still answers
    assert JobQueue(database_path(tmp_path / "var")).counts()["pending"] == 0


@pytest.mark.parametrize("cookie", ["YQ.é", "é.é", "YQ.\u2603", "eyJ9.x\u00ff"])
def test_a_non_ascii_session_cookie_is_an_invalid_session_not_a_500(analysed_root: Path, cookie: str) -> None:
    header = {"Cookie": f"{SESSION_COOKIE}={cookie}".encode()}
    with make_client(auth_settings(analysed_root)) as client:
        r = client.get("/status", headers=header, follow_redirects=False)
        assert r.status_code == 401 and SESSION_COOKIE in r.headers.get("set-cookie", "")  # not logged in
    with make_client(base_settings(analysed_root)) as client:
        assert client.get("/status", headers=header).status_code == 200


def test_an_unwritable_disk_refuses_the_upload_and_leaves_no_temporary_files(
    local_client: TestClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    import dermnode.web.ingest as ingest_module

    def full_disk(*_args: object, **_kwargs: object) -> object:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ingest_module, "wrap_file", full_disk)
    r = upload(local_client, [("lesion.png", lesion_png(), "image/png")])
    assert r.status_code == 422 and "could not be written (nothing was stored)" in r.text
    monkeypatch.setattr(ingest_module.tempfile, "mkdtemp", full_disk)
    r = upload(local_client, [("lesion.png", lesion_png(), "image/png")])
    assert r.status_code == 422 and "could not be written (nothing was stored)" in r.text
    assert JobQueue(database_path(tmp_path / "var")).counts()["pending"] == 0
    assert not list((tmp_path / "var" / "web-uploads").glob("*"))
    assert not list((tmp_path / "var" / "spool").glob("*/*.dcm"))


def test_the_upload_form_and_its_temporary_files_are_closed_even_when_refused(
    local_client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    from starlette.datastructures import FormData

    closed: list[int] = []
    original = FormData.close

    async def counting_close(self: FormData) -> None:
        closed.append(1)
        await original(self)

    monkeypatch.setattr(FormData, "close", counting_close)
    r = upload(local_client, [("lesion.png", lesion_png(), "image/png")], csrf="wrong")
    assert r.status_code == 403 and closed == [1]
    import dermnode.web.ingest as ingest_module

    def boom(*_args: object, **_kwargs: object) -> object:
        raise RuntimeError("unexpected")

    monkeypatch.setattr(ingest_module.Ingest, "accept", boom)
    with pytest.raises(RuntimeError):
        upload(local_client, [("lesion.png", lesion_png(), "image/png")])
    assert closed == [1, 1]
    token = csrf_of(local_client)
    for path in ("/login", "/logout", "/results/1.2.3/replay"):  # no route but the upload takes a file
        r = local_client.post(path, data={"csrf_token": token}, files=[("f", ("a.bin", b"x" * 100, "x/y"))],
                              follow_redirects=False)
        assert r.status_code == 400, path


def test_the_login_throttle_keeps_a_locked_name_locked_through_a_flood_of_invented_names() -> None:
    from dermnode.web.app import LOGIN_FAILURES_ALLOWED, _LoginThrottle

    throttle = _LoginThrottle()
    for _ in range(LOGIN_FAILURES_ALLOWED):
        throttle.failed("alice", "10.0.0.1")
    assert throttle.blocked("alice", "10.0.0.2")  # the name is paused from any address
    for i in range(12_000):  # from many addresses, each below its own limit
        throttle.failed(f"invented-{i}", f"10.{i // 250 % 256}.{i % 250}.{i // 64_000 + 1}")
    assert throttle.blocked("alice", "10.0.0.3")
    assert throttle.size() <= 2 * 10_000  # memory stays bounded


def test_the_login_throttle_pauses_a_client_that_tries_many_names(monkeypatch: pytest.MonkeyPatch) -> None:
    import dermnode.web.app as app_module
    from dermnode.web.app import LOGIN_CLIENT_FAILURES_ALLOWED, LOGIN_LOCKOUT_S, _LoginThrottle

    now = [1000.0]
    monkeypatch.setattr(app_module.time, "monotonic", lambda: now[0])
    throttle = _LoginThrottle()
    for i in range(LOGIN_CLIENT_FAILURES_ALLOWED):
        assert not throttle.blocked(f"name-{i}", "192.0.2.7")
        throttle.failed(f"name-{i}", "192.0.2.7")
    assert throttle.blocked("someone-new", "192.0.2.7")
    assert not throttle.blocked("someone-new", "192.0.2.8")  # another client is not paused
    now[0] += LOGIN_LOCKOUT_S + 1
    assert not throttle.blocked("someone-new", "192.0.2.7")  # the pause ends


def test_many_failed_names_from_one_client_pause_that_client_over_http(analysed_root: Path) -> None:
    from dermnode.web.app import LOGIN_CLIENT_FAILURES_ALLOWED

    with make_client(auth_settings(analysed_root)) as client:
        token = csrf_of(client, "/login")
        for i in range(LOGIN_CLIENT_FAILURES_ALLOWED):
            r = client.post("/login", data={"csrf_token": token, "username": f"guess-{i}", "password": "x"})
            assert r.status_code == 401
        r = client.post("/login", data={"csrf_token": token, "username": "alice", "password": PASSWORD})
        assert r.status_code == 429
