"""Helpers of the web console tests: images, settings, clients, login, upload."""

from __future__ import annotations

import io
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
from fastapi.testclient import TestClient
from PIL import Image

from dermnode.dicom_io.wrap import WrapOptions, wrap_rgb
from dermnode.settings import Settings, StorageSettings, WebSettings, WebUser
from dermnode.web.app import asgi_app, create_app
from dermnode.web.auth import hash_password
from synthetic import synthetic_dermoscopy

PASSWORD = "correct horse battery"
TOKEN = "t0ken-for-the-web-console-tests"


def png_bytes(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


def lesion_png() -> bytes:
    return png_bytes(synthetic_dermoscopy(300, 400))


def green_png() -> bytes:
    """A noisy green photo: a real photograph, but no skin (the quality gate refuses it)."""
    rng = np.random.default_rng(0)
    img = np.full((300, 400, 3), (60, 150, 70), float) + rng.normal(0, 20, (300, 400, 3))
    return png_bytes(np.clip(img, 0, 255).astype(np.uint8))


def dicom_bytes(patient_id: str = "DCM-PAT-7", sop_uid: str | None = None) -> bytes:
    ds = wrap_rgb(synthetic_dermoscopy(240, 320), WrapOptions(patient_id=patient_id, pixel_spacing_mm=0.03,
                                                               sop_instance_uid=sop_uid))
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def base_settings(root: Path, **web: object) -> Settings:
    return Settings(storage=StorageSettings(root=str(root), min_free_mb=1, fsync=False),
                    web=replace(WebSettings(port=0), **web))  # type: ignore[arg-type]


def auth_settings(root: Path, **web: object) -> Settings:
    users = (
        WebUser(name="alice", password_hash=hash_password(PASSWORD), role="admin"),
        WebUser(name="bob", password_hash=hash_password(PASSWORD), role="user"),
    )
    return base_settings(root, bind="0.0.0.0", users=users, bearer_token=TOKEN, **web)


def csrf_of(client: TestClient, path: str = "/upload") -> str:
    match = re.search(r'name="csrf_token" value="([^"]+)"', client.get(path).text)
    assert match is not None, f"no CSRF token on {path}"
    return match.group(1)


def make_client(settings: Settings, base_url: str = "http://127.0.0.1") -> TestClient:
    return TestClient(asgi_app(create_app(settings)), base_url=base_url)


def login(client: TestClient, user: str = "alice", password: str = PASSWORD) -> None:
    token = csrf_of(client, "/login")
    r = client.post("/login", data={"csrf_token": token, "username": user, "password": password, "next": "/"},
                    follow_redirects=False)
    assert r.status_code == 303, r.text


def upload(client: TestClient, files: list[tuple[str, bytes, str]], patient_id: str = "PAT-0042",
           pixel_spacing: str = "", csrf: str | None = None) -> object:
    token = csrf if csrf is not None else csrf_of(client)
    return client.post(
        "/upload",
        data={"csrf_token": token, "patient_id": patient_id, "pixel_spacing": pixel_spacing},
        files=[("files", (name, data, mime)) for name, data, mime in files],
        follow_redirects=False,
    )



def job_uids(root: Path) -> dict[str, str]:
    """Status -> SOP Instance UID of the jobs in a storage root (one per status)."""
    from dermnode.web.state import ConsoleState

    state = ConsoleState(root, Settings().delivery)
    return {row.status: row.sop_instance_uid for row in state.worklist(page_size=100).rows}
