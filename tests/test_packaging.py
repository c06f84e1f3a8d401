"""A wheel of dermnode carries its models: installed outside the checkout, `dermnode analyze` runs."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import cv2
import pytest

from synthetic import synthetic_dermoscopy

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_install_finds_its_models_and_analyses(tmp_path: Path) -> None:
    dist = tmp_path / "dist"
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps", "--no-build-isolation", "-q", "-w", str(dist)],
        capture_output=True, text=True, timeout=300,
    )
    assert built.returncode == 0, built.stderr[-2000:]
    wheel = next(dist.glob("dermnode-*.whl"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    py = venv / "bin" / "python"
    inst = subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
                          capture_output=True, text=True, timeout=300)
    assert inst.returncode == 0, inst.stderr[-2000:]
    # the dependencies (torch ...) come from this environment's site-packages, but not its editable dermnode:
    # a path listed in a .pth file is added to sys.path without running that folder's own .pth files
    site = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    where = subprocess.run([str(py), "-c", "import dermnode, sys; print(dermnode.__file__)"], cwd=tmp_path,
                           capture_output=True, text=True, timeout=120)
    assert where.returncode == 0, where.stderr[-2000:]
    assert Path(where.stdout.strip()).is_relative_to(venv), where.stdout
    photo = tmp_path / "lesion.png"
    cv2.imwrite(str(photo), cv2.cvtColor(synthetic_dermoscopy(seed=3), cv2.COLOR_RGB2BGR))
    env = {k: v for k, v in os.environ.items() if not k.startswith("DERMNODE_")}
    run = subprocess.run([str(venv / "bin" / "dermnode"), "analyze", str(photo), "--out", str(tmp_path / "out")],
                         cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    results = list((tmp_path / "out").glob("*/result.json"))
    assert len(results) == 1
    assert "models" in results[0].read_text()
