"""The console in a real browser (Playwright driving Debian's chromium) against ``dermnode serve`` in a subprocess.

The service runs on free loopback ports with the shipped models, its console bound beyond loopback (0.0.0.0) with
a user from a users file, so the login is part of the flow. Set ``DERMNODE_WEB_SCREENSHOTS=DIR`` to save the
screenshots of the worklist, a result and the upload page into DIR (docs/ holds the committed ones).
"""

from __future__ import annotations

import base64
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from webhelpers import PASSWORD, dicom_bytes, green_png, lesion_png

from dermnode_proc import DermnodeProcess, dermnode_env
from peers import _wait_listening, free_port

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"]
SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
ANALYSIS_TIMEOUT_MS = 120_000

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"{CHROMIUM} is not installed (make setup installs Debian's chromium when run as root)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as exc:  # pragma: no cover - a dependency of the test extra
        pytest.skip(f"playwright is not installed: {exc}")
    playwright = sync_playwright().start()
    try:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
    except Exception as exc:
        playwright.stop()
        pytest.skip(f"{CHROMIUM} cannot be started by Playwright: {exc}")
    yield chromium
    chromium.close()
    playwright.stop()


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[DermnodeProcess, str]]:
    from dermnode.web.auth import hash_password

    root = tmp_path_factory.mktemp("browser")
    users = root / "users.toml"
    users.write_text(f'[[users]]\nname = "alice"\npassword_hash = "{hash_password(PASSWORD)}"\nrole = "admin"\n')
    web_port = free_port()
    env = dermnode_env(root, free_port(), {
        "DERMNODE_WEB__ENABLED": "true",
        "DERMNODE_WEB__BIND": "0.0.0.0",
        "DERMNODE_WEB__PORT": str(web_port),
        "DERMNODE_WEB__USERS_FILE": str(users),
        "DERMNODE_WEB__REFRESH_S": "1",
        "DERMNODE_WORKERS__COUNT": "1",
    })
    proc = DermnodeProcess(root, int(env["DERMNODE_SCP__PORT"]), env)
    proc.start(timeout=180)
    assert proc.proc is not None
    _wait_listening(web_port, proc.proc, 60, proc.log_path)
    yield proc, f"http://127.0.0.1:{web_port}"
    assert proc.stop() == 0, proc.log()[-3000:]


def _screenshot(page: Any, name: str) -> None:
    target = os.environ.get("DERMNODE_WEB_SCREENSHOTS")
    if target:
        page.evaluate("document.activeElement && document.activeElement.blur()")
        Path(target).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(target) / name), full_page=True)


def _login(page: Any, base: str) -> None:
    page.goto(f"{base}/")
    assert "/login" in page.url
    page.fill("#username", "alice")
    page.fill("#password", PASSWORD)
    page.press("#password", "Enter")  # keyboard submit
    page.wait_for_url(f"{base}/")


def _drop(page: Any, selector: str, name: str, data: bytes, mime: str) -> None:
    """Drag and drop a file onto ``selector`` (a DataTransfer built in the page, as a desktop drop makes)."""
    transfer = page.evaluate_handle(
        """([b64, name, mime]) => {
            const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
            const dt = new DataTransfer();
            dt.items.add(new File([bytes], name, { type: mime }));
            return dt;
        }""",
        [base64.b64encode(data).decode(), name, mime],
    )
    page.dispatch_event(selector, "dragenter", {"dataTransfer": transfer})
    page.dispatch_event(selector, "drop", {"dataTransfer": transfer})


def _fits(page: Any, width: int) -> bool:
    page.set_viewport_size({"width": width, "height": 1024})
    return bool(page.evaluate(f"document.documentElement.scrollWidth <= {width} + 1"))


def test_upload_worklist_result_outline_download_and_refusals(
    browser: Any, node: tuple[DermnodeProcess, str], tmp_path: Path
) -> None:
    proc, base = node
    context = browser.new_context(viewport={"width": 1180, "height": 820}, accept_downloads=True)
    try:
        worklist = context.new_page()
        _login(worklist, base)
        # keyboard: the first Tab reaches the skip link
        worklist.keyboard.press("Tab")
        assert worklist.evaluate("document.activeElement.className") == "skip"

        # upload a photo by drag and drop
        page = context.new_page()
        page.goto(f"{base}/upload")
        _drop(page, "#dropzone", "lesion.png", lesion_png(), "image/png")
        assert "lesion.png" in page.inner_text("#file-list")
        page.fill("#patient_id", "PAT-0042")
        page.fill("#pixel_spacing", "0.02")
        _screenshot(page, "web-upload.png")
        page.click("#upload-button")
        page.wait_for_url(f"{base}/results/**")
        uid = page.url.rsplit("/", 1)[1]

        # the worklist (not reloaded by the test) shows the row and turns it "analysed"
        row = f'tr[data-sop-instance-uid="{uid}"]'
        worklist.wait_for_selector(row, timeout=30_000)
        worklist.wait_for_selector(f'{row}[data-status="analysed"]', timeout=ANALYSIS_TIMEOUT_MS)
        assert "PAT-0042" in worklist.inner_text(row) and "analysed" in worklist.inner_text(row)

        # the result page fills in by itself
        page.wait_for_selector("#melanoma-probability", timeout=ANALYSIS_TIMEOUT_MS)
        assert page.inner_text("#job-status") == "analysed"
        assert "mm per pixel" in page.inner_text("#calibration")
        assert page.locator("#class-probabilities tbody tr").count() == 9
        assert page.get_attribute("#overlay-img", "alt")
        assert page.evaluate("document.getElementById('source-img').naturalWidth") > 0
        # outline toggle, by mouse and by keyboard
        page.click("#toggle-outline")
        assert page.get_attribute("#toggle-outline", "aria-pressed") == "false"
        assert "hidden" in (page.get_attribute("#overlay-img", "class") or "")
        page.focus("#toggle-outline")
        page.keyboard.press("Space")
        assert page.get_attribute("#toggle-outline", "aria-pressed") == "true"
        assert "hidden" not in (page.get_attribute("#overlay-img", "class") or "")
        page.click("#zoom-in")
        assert page.inner_text("#zoom-level") == "150 %"
        page.click("#zoom-fit")
        _screenshot(page, "web-result.png")
        # download the SEG and check it
        with page.expect_download() as download:
            page.click("#dl-seg-dcm")
        seg_path = tmp_path / "seg.dcm"
        download.value.save_as(seg_path)
        seg = pydicom.dcmread(seg_path)
        assert seg.SOPClassUID == SEGMENTATION_STORAGE and seg.Modality == "SEG" and seg.PatientID == "PAT-0042"
        referenced = seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0].ReferencedSOPInstanceUID
        assert referenced == uid
        assert _fits(page, 768), "the result page overflows at tablet width"

        # a refused upload says why
        page.goto(f"{base}/upload")
        notes = tmp_path / "notes.png"
        notes.write_bytes(b"these are notes, not a photo")
        page.set_input_files("#files", str(notes))
        page.fill("#patient_id", "PAT-0042")
        page.click("#upload-button")
        page.wait_for_selector("#refused")
        assert "not an image" in page.inner_text("#refused")

        # a photo that is not skin: stored and analysed like any image, refused by the quality gate, which says why
        green = tmp_path / "green.png"
        green.write_bytes(green_png())
        page.goto(f"{base}/upload")
        page.set_input_files("#files", str(green))
        page.fill("#patient_id", "PAT-0042")
        page.click("#upload-button")
        page.wait_for_url(f"{base}/results/**")
        page.wait_for_selector("#gate-verdict", timeout=ANALYSIS_TIMEOUT_MS)
        assert "colours are not those of skin" in page.inner_text("#gate-verdict")
        green_uid = page.url.rsplit("/", 1)[1]
        worklist.wait_for_selector(f'tr[data-sop-instance-uid="{green_uid}"][data-status="not_analysable"]',
                                   timeout=30_000)

        # a DICOM file keeps its own identity (no patient ID typed)
        dicom = tmp_path / "image.dcm"
        dicom.write_bytes(dicom_bytes("PAT-0107"))
        page.goto(f"{base}/upload")
        page.set_input_files("#files", str(dicom))
        page.click("#upload-button")
        page.wait_for_url(f"{base}/results/**")
        page.wait_for_selector("#melanoma-probability", timeout=ANALYSIS_TIMEOUT_MS)
        assert "PAT-0107" in page.inner_text(".ids")
        dicom_uid = page.url.rsplit("/", 1)[1]
        worklist.wait_for_selector(f'tr[data-sop-instance-uid="{dicom_uid}"][data-status="analysed"]',
                                   timeout=30_000)
        _screenshot(worklist, "web-worklist.png")
        assert _fits(worklist, 768), "the worklist overflows at tablet width"

        page.goto(f"{base}/status")
        assert page.inner_text("#health") == "ok"
    finally:
        context.close()

    # unauthenticated: no result, no file, no patient data
    anonymous = browser.new_context()
    try:
        stranger = anonymous.new_page()
        stranger.goto(f"{base}/results/{uid}")
        assert "/login" in stranger.url and "PAT-0042" not in stranger.content()
        for path in (f"/results/{uid}/files/seg.dcm", f"/results/{uid}/image/source.png", "/status"):
            response = anonymous.request.get(f"{base}{path}", max_redirects=0)
            assert response.status in (303, 401), path
            assert b"PAT-0042" not in response.body()
    finally:
        anonymous.close()

    log = proc.log()
    assert f"web: alice viewed the result of sop_instance={uid}" in log
    assert "PAT-0042" not in log and "PAT-0107" not in log  # no PHI in the log at INFO
