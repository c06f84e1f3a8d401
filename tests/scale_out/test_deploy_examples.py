"""The multi-host deployment examples under ``deploy/`` stay valid: the compose file is YAML with the three roles,
the example configuration loads (shared state, password from the environment only), and the systemd units pass
``systemd-analyze verify`` (skipped where it is not installed)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dermnode.settings import load_settings

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"


def test_compose_file_is_yaml_with_every_role_and_no_password() -> None:
    yaml = pytest.importorskip("yaml")
    text = (DEPLOY / "compose.yaml").read_text()
    doc = yaml.safe_load(text)
    services = doc["services"]
    roles = {name: svc["command"][svc["command"].index("--role") + 1]
             for name, svc in services.items() if "--role" in svc.get("command", [])}
    assert roles == {"receive": "receive", "analyze": "analyze", "deliver": "deliver"}
    for name in roles:
        svc = services[name]
        assert svc["image"] and svc["volumes"], name  # the anchor was merged
        assert any(v.endswith(":/mnt/dermnode") for v in svc["volumes"]), "the shared storage root"
        env = svc["environment"]
        assert env["DERMNODE_STATE__PASSWORD"].startswith("${"), "the password comes from the environment"
        assert "password" not in env["DERMNODE_STATE__DSN"]
    assert services["analyze"]["deploy"]["replicas"] >= 2 and services["receive"]["deploy"]["replicas"] >= 2
    assert "11112:11112" in services["lb"]["ports"]
    assert (DEPLOY / "haproxy.cfg").is_file()
    assert "change-me" not in text


def test_example_configuration_is_the_shared_state() -> None:
    env = {"DERMNODE_STATE__PASSWORD": "from-the-environment"}
    settings = load_settings(DEPLOY / "dermnode.toml", environ=env)
    assert settings.state.backend == "postgresql"
    assert settings.state.password == "from-the-environment"
    assert "from-the-environment" not in repr(settings)
    assert settings.storage.root == "/mnt/dermnode"
    assert [p.name for p in settings.pacs] == ["pacs"]


@pytest.mark.parametrize("unit", ["dermnode@receive.service", "dermnode@analyze-2.service",
                                  "dermnode@deliver.service", "dermnode-prune.service", "dermnode-prune.timer"])
def test_systemd_units_verify(unit: str, tmp_path: Path) -> None:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed")
    dermnode = Path(sys.prefix) / "bin" / "dermnode"
    for src in (DEPLOY / "systemd").iterdir():
        # the units name the installed path; verify checks that executables exist, so point it at this venv
        (tmp_path / src.name).write_text(src.read_text().replace("/opt/dermnode/venv/bin/dermnode", str(dermnode)))
    done = subprocess.run([tool, "verify", f"./{unit}"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    ours = [line for line in (done.stdout + done.stderr).splitlines()
            if "dermnode" in line and "Documentation" not in line]
    assert done.returncode == 0 and not ours, done.stdout + done.stderr


def test_template_unit_takes_the_role_from_the_instance_name() -> None:
    text = (DEPLOY / "systemd" / "dermnode@.service").read_text()
    line = next(x for x in text.splitlines() if x.startswith("ExecStart="))
    # systemd turns %% into % and $$ into $: what /bin/sh gets
    script = line.split("'")[1].replace("%%", "%").replace("$$", "$")
    for instance, role in (("receive", "receive"), ("analyze-2", "analyze"), ("deliver", "deliver")):
        out = subprocess.run(["/bin/sh", "-c", script.replace("exec ", "echo "), "dermnode", instance],
                             capture_output=True, text=True, timeout=10).stdout.split()
        assert out[-2:] == ["--role", role], out
