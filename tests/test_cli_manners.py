"""The CLI's manners (issue 16, items 7-12, 14, 15): bad inputs get a sentence, not a traceback; help texts;
summaries; exit statuses."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import pydicom
import pytest
from PIL import Image

from dermnode.dicom_io.wrap import WrapOptions, wrap_rgb
from dermnode_proc import require
from synthetic import synthetic_dermoscopy

REPO = Path(__file__).resolve().parents[1]
MODELS = Path(os.environ.get("DERMNODE_ANALYSIS__MODELS_DIR") or REPO / "models")
needs_models = pytest.mark.skipif(
    not (MODELS / "segmentation.json").is_file() or not (MODELS / "classifier.json").is_file(),
    reason="shipped models not found",
)


def dermnode(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dermnode.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})


def _dicom(path: Path, seed: int = 0) -> pydicom.Dataset:
    ds = wrap_rgb(synthetic_dermoscopy(300, 400, seed=seed), WrapOptions(pixel_spacing_mm=0.05))
    ds.save_as(path, enforce_file_format=True)
    return ds


def _truncated(tmp_path: Path) -> list[Path]:
    """The first 20 KB of a valid file (UIDs readable, pixel data cut) and its first 300 bytes (inside the meta)."""
    full = tmp_path / "full.dcm"
    _dicom(full)
    data = full.read_bytes()
    out = []
    for n in (20_000, 300):
        p = tmp_path / f"trunc{n}.dcm"
        p.write_bytes(data[:n])
        out.append(p)
    return out


# --- item 7 ----------------------------------------------------------------------------------------------------
def test_send_of_a_truncated_file_says_so_without_a_traceback(tmp_path: Path) -> None:
    res = dermnode("send", *map(str, _truncated(tmp_path)), "--port", "9", "--timeout", "2")
    assert res.returncode == 1, res.stderr
    assert res.stderr.count("truncated or not DICOM") == 2, res.stderr
    assert "Traceback" not in res.stderr and "UserWarning" not in res.stderr + res.stdout
    assert "nothing to send" in res.stderr


@needs_models
def test_analyze_of_truncated_files_says_so_and_goes_on(tmp_path: Path) -> None:
    good = tmp_path / "good.dcm"
    ds = _dicom(good, seed=3)
    res = dermnode("analyze", *map(str, _truncated(tmp_path)), str(good), "--out", str(tmp_path / "out"))
    assert res.returncode == 1
    lines = res.stdout.splitlines()
    bad_lines = [ln for ln in lines if "truncated or not DICOM" in ln]
    assert len(bad_lines) == 2, res.stdout
    assert "not a composite instance" not in res.stdout + res.stderr
    assert any(str(good) in ln and str(ds.SOPInstanceUID) in ln for ln in lines), res.stdout
    assert "UserWarning" not in res.stderr + res.stdout and "Traceback" not in res.stderr


# --- item 8 ----------------------------------------------------------------------------------------------------
def test_send_of_a_photograph_says_wrap_it_first(tmp_path: Path) -> None:
    photo = tmp_path / "photo.jpg"
    Image.fromarray(synthetic_dermoscopy(60, 80)).save(photo)
    res = dermnode("send", str(photo), "--port", "9", "--timeout", "2")
    assert res.returncode == 1
    assert "not a DICOM file: wrap it first with `dermnode wrap`" in res.stderr
    assert "force=True" not in res.stderr + res.stdout and "DICM prefix" not in res.stderr


def test_send_accepts_a_folder(tmp_path: Path) -> None:
    from peers import start_storescp

    require("storescp")
    folder = tmp_path / "folder"
    folder.mkdir()
    uids = {str(_dicom(folder / f"img{i}.dcm", seed=i).SOPInstanceUID) for i in range(2)}
    (folder / "README.md").write_text("notes")
    scp = start_storescp(tmp_path / "in", aet="RECEIVER")
    try:
        res = dermnode("send", str(folder), "--port", str(scp.port), "--called-aet", "RECEIVER")
        assert res.returncode == 0, res.stderr
        assert "Is a directory" not in res.stderr
        assert {str(pydicom.dcmread(p).SOPInstanceUID) for p in scp.received()} == uids
        assert "sent 2 file(s)" in res.stdout
    finally:
        scp.stop()


# --- item 9 ----------------------------------------------------------------------------------------------------
@needs_models
def test_analyze_names_each_input_and_ends_with_a_summary(tmp_path: Path) -> None:
    good = tmp_path / "lesion.dcm"
    ds = _dicom(good, seed=1)
    blank = tmp_path / "blank.png"
    Image.new("RGB", (400, 300), (40, 40, 40)).save(blank)
    garbage = tmp_path / "garbage.dcm"
    garbage.write_bytes(b"\0" * 128 + b"DICM" + b"garbage")
    res = dermnode("analyze", str(good), str(blank), str(garbage), "--out", str(tmp_path / "out"))
    lines = res.stdout.splitlines()
    (good_line,) = [ln for ln in lines if ln.startswith(f"{good}: ")]
    assert str(ds.SOPInstanceUID) in good_line and "analysed" in good_line
    (blank_line,) = [ln for ln in lines if ln.startswith(f"{blank}: ")]
    assert "not_analysable" in blank_line or "not analysable" in blank_line
    assert [ln for ln in lines if ln.startswith(f"{garbage}: ")]
    assert "1 analysed, 1 not analysable, 1 failed" in res.stdout
    assert res.returncode == 1


def test_analyze_of_a_folder_without_images_says_where_it_looked(tmp_path: Path) -> None:
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "README.md").write_text("x")
    (folder / "labels.csv").write_text("a,b\n")
    res = dermnode("analyze", str(folder), "--out", str(tmp_path / "out"), env={"DERMNODE_ANALYSIS__MODELS_DIR": ""})
    assert res.returncode == 1
    assert f"no images in {folder}" in res.stderr
    assert "README.md" in res.stderr and "labels.csv" in res.stderr


# --- item 10 ---------------------------------------------------------------------------------------------------
def test_evaluate_of_a_missing_folder_says_it_does_not_exist(tmp_path: Path) -> None:
    missing = tmp_path / "nonexist"
    res = dermnode("evaluate", "--data", str(missing), "--out", str(tmp_path / "out"))
    assert res.returncode == 2
    assert f"{missing} does not exist" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "out").exists()


def test_evaluate_prints_a_short_table_and_the_metrics_path(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """The metrics JSON stays in metrics.json; the terminal gets a short table and where the file is. A folder
    without a split column is evaluated whole and called so (split "all", as split_evaluated)."""
    from dermnode import cli

    data = tmp_path / "clinic"
    (data / "images").mkdir(parents=True)
    (data / "labels.csv").write_text("image_id,diagnosis\nA,NV\n")
    seen: dict[str, str] = {}

    def fake_evaluate(data_dir: Path, split: str, settings: object, out_dir: Path, *, task: str = "all") -> dict:  # type: ignore[type-arg]
        seen["split"] = split
        out_dir.mkdir(parents=True, exist_ok=True)
        doc = {"data": str(data_dir), "split": split, "pipeline": {
            "split_evaluated": "all", "images": 120, "analysed": 118,
            "melanoma": {"auc": 0.8123456, "balanced_accuracy": 0.7, "per_class": {f"c{i}": i for i in range(200)}},
        }}
        (out_dir / "metrics.json").write_text("{}")
        return doc

    monkeypatch.setattr("dermnode.evaluation.runner.evaluate", fake_evaluate)
    out = tmp_path / "eval"
    assert cli.main(["evaluate", "--data", str(data), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert seen["split"] == "all"
    assert str(out / "metrics.json") in printed
    assert len(printed.splitlines()) < 40
    assert "0.812" in printed and "0.8123456" not in printed


# --- item 11 ---------------------------------------------------------------------------------------------------
def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


def test_every_option_has_help_and_shows_its_default() -> None:
    from dermnode.cli import build_parser

    for name, sub in _subparsers(build_parser()).items():
        text = sub.format_help()
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help, f"{name} {action.option_strings or action.dest}: no help text"
            default = action.default
            if default not in (None, False, argparse.SUPPRESS) and action.option_strings:
                assert f"(default: {default})" in " ".join(text.split()), f"{name} {action.option_strings}"
    send = " ".join(_subparsers(build_parser())["send"].format_help().split())
    assert "seconds" in send  # the unit of --timeout


def test_train_arch_lists_the_allowed_values() -> None:
    from dermnode.cli import build_parser
    from dermnode.inference.classifier_models import ARCHS, TIMM_BACKBONES

    text = " ".join(_subparsers(build_parser())["train"].format_help().split())
    for arch in [*ARCHS, *TIMM_BACKBONES, "lite_unet", "smp_unet"]:
        assert arch in text, arch


# --- item 12 ---------------------------------------------------------------------------------------------------
def _database(tmp_path: Path) -> tuple[Path, int, int]:
    """A storage root with a finished job (and its done delivery); returns (root, job id, delivery id)."""
    from dermnode.settings import DeliverySettings
    from dermnode.workqueue.db import database_path
    from dermnode.workqueue.jobs import JobQueue
    from dermnode.workqueue.outbox import Outbox

    root = tmp_path / "var"
    root.mkdir()
    queue = JobQueue(database_path(root))
    queue.enqueue("1.2.3.4", "1.2.840.10008.5.1.4.1.1.77.1.7", root / "x.dcm")
    job = queue.claim("t")
    assert job is not None
    queue.complete(job, "analysed")
    outbox = Outbox(database_path(root), DeliverySettings())
    outbox.add(job.id, "dicom", "pacs:main", "1.2.3.4.5", root / "sr.dcm")
    return root, job.id, 1


@pytest.mark.parametrize("what", ["missing-job", "missing-delivery", "finished-job", "finished-delivery"])
def test_replay_of_nothing_says_why_and_fails(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                             monkeypatch: pytest.MonkeyPatch, what: str) -> None:
    from dermnode import cli

    root, job_id, delivery_id = _database(tmp_path)
    monkeypatch.setenv("DERMNODE_STORAGE__ROOT", str(root))
    args = {
        "missing-job": ["replay", "999"],
        "missing-delivery": ["replay", "--delivery", "999"],
        "finished-job": ["replay", str(job_id)],
        "finished-delivery": ["replay", "--delivery", str(delivery_id)],
    }[what]
    assert cli.main(args) == 1
    err = capsys.readouterr().err
    if what.startswith("missing"):
        assert "does not exist" in err
    else:
        assert "is not dead-lettered" in err


# --- item 14 ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("spacing", ["-1", "0", "nan", "inf"])
def test_wrap_refuses_a_non_positive_pixel_spacing(tmp_path: Path, spacing: str) -> None:
    photo = tmp_path / "p.png"
    Image.fromarray(synthetic_dermoscopy(60, 80)).save(photo)
    res = dermnode("wrap", str(photo), "--out", str(tmp_path / "p.dcm"), f"--pixel-spacing={spacing}")
    assert res.returncode == 2
    assert "--pixel-spacing" in res.stderr and "positive" in res.stderr
    assert not (tmp_path / "p.dcm").exists()


# --- item 15 ---------------------------------------------------------------------------------------------------
def test_status_into_a_closed_pipe_is_quiet(tmp_path: Path) -> None:
    root, _, _ = _database(tmp_path)
    env = {**os.environ, "DERMNODE_STORAGE__ROOT": str(root)}
    proc = subprocess.run(
        f"{sys.executable} -m dermnode.cli status --dead-letters --json | head -1",
        shell=True, capture_output=True, text=True, env=env, timeout=120,
    )
    assert "BrokenPipeError" not in proc.stderr and "Traceback" not in proc.stderr


def test_status_dead_letters_show_iso_local_times(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from dermnode import cli
    from dermnode.workqueue.db import database_path
    from dermnode.workqueue.jobs import JobQueue

    root, _, _ = _database(tmp_path)
    queue = JobQueue(database_path(root))
    queue.enqueue("1.2.3.9", "1.2.840.10008.5.1.4.1.1.77.1.7", root / "y.dcm")
    job = queue.claim("t")
    assert job is not None
    queue.fail(job, "DecodeError: broken", permanent=True)
    monkeypatch.setenv("DERMNODE_STORAGE__ROOT", str(root))
    assert cli.main(["status", "--dead-letters"]) == 0
    out = capsys.readouterr().out
    today = time.strftime("%Y-%m-%d")
    assert f'"created_at": "{today}T' in out
    assert time.strftime("%z")[:3] in out  # the local UTC offset is written
