from __future__ import annotations

from pathlib import Path

import pytest

from dermnode.errors import ConfigError
from dermnode.settings import load_settings


def test_defaults_serve_one_machine() -> None:
    s = load_settings(environ={})
    assert s.scp.ae_title == "DERMNODE" and s.scp.bind == "127.0.0.1" and s.scp.port == 11112
    assert s.scp.allowed_calling_aets == () and s.storage.root == "var"
    assert s.fhir.base_url == "" and s.pacs == ()


def test_toml_then_environment_override(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(
        '[scp]\nport = 2000\nallowed_calling_aets = ["A", "B"]\n'
        '[[pacs]]\nname = "main"\nae_title = "ORTHANC"\nhost = "127.0.0.1"\nport = 4242\n'
        '[[analysis.calibrations]]\nmanufacturer = "FotoFinder"\nmodel = "medicam 1000"\npixel_spacing_mm = 0.02\n'
    )
    s = load_settings(cfg, environ={"DERMNODE_SCP__PORT": "11113", "DERMNODE_WORKERS__COUNT": "2"})
    assert s.scp.port == 11113 and s.workers.count == 2
    assert s.scp.allowed_calling_aets == ("A", "B")
    assert s.pacs[0].ae_title == "ORTHANC" and s.analysis.calibrations[0].pixel_spacing_mm == 0.02


def test_config_from_environment_variable(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text("[storage]\nroot = '/srv/dermnode'\n")
    assert load_settings(environ={"DERMNODE_CONFIG": str(cfg)}).storage.root == "/srv/dermnode"


@pytest.mark.parametrize(
    ("env", "key"),
    [
        ({"DERMNODE_SCP__PORT": "abc"}, "scp.port"),
        ({"DERMNODE_SCP__PORT": "70000"}, "scp.port"),
        ({"DERMNODE_SCP__NOPE": "1"}, "nope"),
        ({"DERMNODE_FHIR__VERSION": "DSTU2"}, "fhir.version"),
        ({"DERMNODE_SCP__AE_TITLE": "WAY_TOO_LONG_AE_TITLE"}, "AE title"),
        ({"DERMNODE_STORAGE__FSYNC": "maybe"}, "storage.fsync"),
        ({"DERMNODE_SCP__TLS__ENABLED": "true"}, "scp.tls"),
        ({"DERMNODE_FHIR__BASE_URL": "ftp://x"}, "fhir.base_url"),
        ({"DERMNODE_FHIR__BASE_URL": "https://ehr.example/fhir"}, "fhir.patient_identifier_system"),
        ({"DERMNODE_WORKERS__POLL_INTERVAL_S": "0"}, "workers.poll_interval_s"),
        ({"DERMNODE_DELIVERY__BACKOFF_INITIAL_S": "-5"}, "delivery.backoff_initial_s"),
        ({"DERMNODE_DELIVERY__BACKOFF_INITIAL_S": "900"}, "delivery.backoff_initial_s"),
        ({"DERMNODE_FHIR__TIMEOUT_S": "0"}, "fhir.timeout_s"),
        ({"DERMNODE_SCP__DIMSE_TIMEOUT_S": "-1"}, "scp.dimse_timeout_s"),
        ({"DERMNODE_SCP__ACSE_TIMEOUT_S": "1e9"}, "scp.acse_timeout_s"),
        ({"DERMNODE_ANALYSIS__TORCH_THREADS": "-1"}, "analysis.torch_threads"),
    ],
)
def test_bad_values_name_the_key(env: dict[str, str], key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_settings(environ=env)


def test_bad_toml_is_a_clear_error(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text("[scp\nport=1")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(cfg, environ={})
    with pytest.raises(ConfigError, match="cannot read"):
        load_settings(tmp_path / "missing.toml", environ={})


def test_shipped_configs_are_valid() -> None:
    root = Path(__file__).resolve().parents[1] / "config"
    files = sorted(root.glob("*.toml"))
    assert files, "config/ ships example configurations"
    for f in files:
        load_settings(f, environ={})


def _pacs_toml(tmp_path: Path, *tables: str, complete: bool = True) -> Path:
    """[[pacs]] tables; with ``complete``, each gets an address for the keys it does not set itself."""
    address = {"ae_title": 'ae_title = "PACS"', "host": 'host = "pacs.example"', "port": "port = 104"}
    text = ""
    for t in tables:
        keys = {line.split("=")[0].strip() for line in t.splitlines() if "=" in line}
        extra = [line for key, line in address.items() if complete and key not in keys]
        text += "[[pacs]]\n" + "\n".join([t, *extra]) + "\n"
    cfg = tmp_path / "pacs.toml"
    cfg.write_text(text)
    return cfg


def test_pacs_destinations_need_distinct_names(tmp_path: Path) -> None:
    """Two [[pacs]] tables with the default name would share one outbox key: one PACS would get nothing."""
    cfg = _pacs_toml(tmp_path, 'host = "a.example"', 'host = "b.example"')
    with pytest.raises(ConfigError, match=r"pacs\.name 'pacs' names more than one"):
        load_settings(cfg, environ={})
    cfg = _pacs_toml(tmp_path, 'name = "a"\nhost = "a.example"', 'name = "b"\nhost = "b.example"')
    assert [p.name for p in load_settings(cfg, environ={}).pacs] == ["a", "b"]
    with pytest.raises(ConfigError, match=r"pacs\.name"):
        load_settings(_pacs_toml(tmp_path, 'name = " "'), environ={})


def test_pacs_calling_ae_title_is_validated(tmp_path: Path) -> None:
    cfg = _pacs_toml(tmp_path, 'calling_ae_title = "A_CALLING_AE_TITLE_TOO_LONG"')
    with pytest.raises(ConfigError, match=r"pacs\.calling_ae_title"):
        load_settings(cfg, environ={})
    assert load_settings(_pacs_toml(tmp_path, 'calling_ae_title = "DERMNODE_OUT"'), environ={}).pacs[0].calling_ae_title


def test_fhir_endpoint_with_patient_identifier_system_is_accepted() -> None:
    env = {"DERMNODE_FHIR__BASE_URL": "https://ehr.example/fhir",
           "DERMNODE_FHIR__PATIENT_IDENTIFIER_SYSTEM": "http://hospital.example/mrn"}
    assert load_settings(environ=env).fhir.patient_identifier_system == "http://hospital.example/mrn"


def test_backoff_initial_may_not_exceed_max() -> None:
    env = {"DERMNODE_DELIVERY__BACKOFF_INITIAL_S": "60", "DERMNODE_DELIVERY__BACKOFF_MAX_S": "10"}
    with pytest.raises(ConfigError, match="backoff_initial_s must not exceed"):
        load_settings(environ=env)


def test_job_retry_delay_may_not_exceed_its_max() -> None:
    assert load_settings(environ={}).workers.retry_delay_max_s == 600
    env = {"DERMNODE_WORKERS__RETRY_DELAY_S": "60", "DERMNODE_WORKERS__RETRY_DELAY_MAX_S": "10"}
    with pytest.raises(ConfigError, match="retry_delay_s must not exceed"):
        load_settings(environ=env)


def test_pacs_table_needs_its_address(tmp_path: Path) -> None:
    """No hidden defaults: a [[pacs]] table without ae_title, host or port is an error naming the key."""
    with pytest.raises(ConfigError, match="AE title"):
        load_settings(_pacs_toml(tmp_path, 'name = "x"\nhost = "pacs.example"\nport = 104', complete=False), environ={})
    with pytest.raises(ConfigError, match=r"pacs\.host"):
        load_settings(_pacs_toml(tmp_path, 'name = "x"\nae_title = "PACS"\nport = 104', complete=False), environ={})
    with pytest.raises(ConfigError, match=r"pacs\.port is required in the \[\[pacs\]\] table 'x'"):
        cfg = _pacs_toml(tmp_path, 'name = "x"\nae_title = "PACS"\nhost = "pacs.example"', complete=False)
        load_settings(cfg, environ={})


def test_tls_material_without_tls_enabled_is_an_error() -> None:
    """A certificate configured but TLS off would leave the SCP accepting plain associations, silently."""
    env = {"DERMNODE_SCP__TLS__CERTIFICATE": "/etc/dermnode/server.crt"}
    with pytest.raises(ConfigError, match=r"scp\.tls\.enabled is false"):
        load_settings(environ=env)


def test_state_defaults_to_embedded_sqlite() -> None:
    state = load_settings(environ={}).state
    assert (state.backend, state.dsn, state.password) == ("sqlite", "", "")


def test_postgresql_state_needs_a_dsn_without_password(tmp_path: Path) -> None:
    base = {"DERMNODE_STATE__BACKEND": "postgresql"}
    with pytest.raises(ConfigError, match=r"state\.dsn is required"):
        load_settings(environ=base)
    with pytest.raises(ConfigError, match="must not hold the password") as err:
        load_settings(environ={**base, "DERMNODE_STATE__DSN": "postgresql://u:hunter2secret@db/dermnode"})
    assert "hunter2secret" not in str(err.value)
    toml = tmp_path / "c.toml"
    toml.write_text('[state]\nbackend = "postgresql"\ndsn = "host=db dbname=d"\npassword = "hunter2secret"\n')
    with pytest.raises(ConfigError, match="must not be in the configuration file") as err:
        load_settings(toml, environ={})
    assert "hunter2secret" not in str(err.value)
    ok = load_settings(environ={**base, "DERMNODE_STATE__DSN": "host=db dbname=d user=u",
                                "DERMNODE_STATE__PASSWORD": "hunter2secret"})
    assert ok.state.password == "hunter2secret" and "hunter2secret" not in repr(ok)
