"""The [web] settings, password hashes and sessions, and the console inside the service (start, taken port, stop)."""

from __future__ import annotations

import socket
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from dermnode.errors import ConfigError
from dermnode.service import Service
from dermnode.settings import (
    ScpSettings,
    Settings,
    StorageSettings,
    WebSettings,
    WorkerSettings,
    is_loopback,
    load_settings,
)
from dermnode.web.auth import Authenticator, csrf_ok, hash_password, load_users, verify_password
from dermnode.web.server import WebPortError
from peers import free_port

# -- settings ---------------------------------------------------------------------------------------------------


def test_defaults_serve_the_console_on_loopback_8080() -> None:
    web = load_settings(environ={}).web
    assert (web.enabled, web.bind, web.port) == (True, "127.0.0.1", 8080)


def test_beyond_loopback_without_authentication_is_a_configuration_error() -> None:
    with pytest.raises(ConfigError, match=r"web.bind = '0.0.0.0' makes the web console reachable beyond this "
                                          r"machine, but no authentication is configured"):
        load_settings(environ={"DERMNODE_WEB__BIND": "0.0.0.0"})
    # fine: disabled, loopback, or with a token
    load_settings(environ={"DERMNODE_WEB__BIND": "0.0.0.0", "DERMNODE_WEB__ENABLED": "false"})
    load_settings(environ={"DERMNODE_WEB__BIND": "::1"})
    load_settings(environ={"DERMNODE_WEB__BIND": "0.0.0.0", "DERMNODE_WEB__BEARER_TOKEN": "x" * 20})


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ('[[web.users]]\nname = "a"\npassword_hash = "secret"\n', "is not a salted hash"),
        ('[[web.users]]\nname = "a"\npassword_hash = "HASH"\nrole = "root"\n', "is not one of user, admin"),
        ('[[web.users]]\nname = "a"\npassword_hash = "HASH"\n[[web.users]]\nname = "a"\npassword_hash = "HASH"\n',
         "names more than one user"),
        ('[web]\nbearer_token = "short"\n', "too short"),
        ('[web]\nsession_secret = "short"\n', "too short"),
        ('[web]\ntls_certificate = "c.pem"\n', "go together"),
        ('[web]\nport = 70000\n', "web.port: 70000 is outside"),
        ('[web]\nmax_upload_mb = 0\n', "web.max_upload_mb"),
        ('[web]\nrefresh_s = 0\n', "web.refresh_s"),
        ('[web]\nunknown = 1\n', "unknown setting web.unknown"),
    ],
)
def test_invalid_web_settings_name_the_key(tmp_path: Path, toml: str, message: str) -> None:
    path = tmp_path / "c.toml"
    path.write_text(toml.replace("HASH", hash_password("pw-123456")))
    with pytest.raises(ConfigError, match=message):
        load_settings(path, environ={})


def test_users_from_config_and_file(tmp_path: Path) -> None:
    users_file = tmp_path / "users.toml"
    users_file.write_text(f'[[users]]\nname = "carol"\npassword_hash = "{hash_password("pw-carol-1")}"\n')
    config = tmp_path / "c.toml"
    config.write_text(
        f'[web]\nbind = "0.0.0.0"\nusers_file = "{users_file}"\n'
        f'[[web.users]]\nname = "dave"\npassword_hash = "{hash_password("pw-dave-1")}"\nrole = "admin"\n'
    )
    settings = load_settings(config, environ={})
    users = load_users(settings.web)
    assert {n: u.role for n, u in users.items()} == {"dave": "admin", "carol": "user"}
    auth = Authenticator(settings.web)
    assert auth.login("carol", "pw-carol-1") is not None and auth.login("carol", "nope") is None
    assert auth.login("nobody", "pw-carol-1") is None
    users_file.write_text('[[users]]\nname = "eve"\npassword_hash = "plain"\n')
    with pytest.raises(ConfigError, match="not a salted hash"):
        load_users(settings.web)


def test_is_loopback() -> None:
    assert all(map(is_loopback, ("127.0.0.1", "127.1.2.3", "::1", "[::1]", "localhost")))
    assert not any(map(is_loopback, ("0.0.0.0", "::", "10.0.0.5", "dermnode.example")))


# -- passwords and sessions -----------------------------------------------------------------------------------


def test_password_hashes_are_salted_and_verified_in_both_formats() -> None:
    import base64
    import hashlib

    a, b = hash_password("s3cret-pw"), hash_password("s3cret-pw")
    assert a != b and a.startswith("scrypt$16384$8$1$")
    assert verify_password("s3cret-pw", a) and not verify_password("s3cret-PW", a)
    salt = b"0123456789abcdef"
    digest = hashlib.pbkdf2_hmac("sha256", b"pw", salt, 100_000)
    pbkdf2 = "pbkdf2_sha256$100000${}${}".format(*(base64.urlsafe_b64encode(x).decode() for x in (salt, digest)))
    assert verify_password("pw", pbkdf2) and not verify_password("pw2", pbkdf2)
    assert not verify_password("pw", "garbage") and not verify_password("pw", "scrypt$1$2$3$%%%$%%%")


def test_session_cookies_are_signed_and_expire() -> None:
    auth = Authenticator(WebSettings(bearer_token="b" * 20, session_secret="s" * 40, session_max_age_s=60))
    session = auth.new_session(None)
    value = auth.encode_session(session)
    assert auth.decode_session(value) == session
    body, sig = value.split(".")
    assert auth.decode_session(body + "." + sig[::-1]) == {}
    other = Authenticator(WebSettings(bearer_token="b" * 20, session_secret="t" * 40))
    assert other.decode_session(value) == {}  # another secret
    assert auth.decode_session(auth.encode_session({**session, "exp": time.time() - 1})) == {}
    assert csrf_ok(session, str(session["csrf"])) and not csrf_ok(session, "x") and not csrf_ok({}, "x")
    assert auth.principal_of({**session, "user": "ghost", "role": "admin"}) is None  # not a configured user


# -- in the service ---------------------------------------------------------------------------------------------


def _settings(root: Path, web_port: int) -> Settings:
    return Settings(
        scp=ScpSettings(port=0),
        storage=StorageSettings(root=str(root), min_free_mb=1),
        workers=WorkerSettings(count=0),
        web=WebSettings(port=web_port),
    )


def test_service_serves_the_console_and_stops_it(tmp_path: Path) -> None:
    port = free_port()
    service = Service(_settings(tmp_path, port), {})
    try:
        service.start()
        assert service.web_port == port
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/status", timeout=10) as r:
            assert r.status == 200 and b"Status" in r.read()
    finally:
        service.close()
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2)
    with socket.socket() as s:  # the port is free again
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))


def test_a_taken_console_port_is_a_clear_error_and_nothing_is_left_running(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        service = Service(_settings(tmp_path, port), {})
        try:
            with pytest.raises(WebPortError, match=rf"cannot bind the web console port 127.0.0.1:{port} "
                                                   r"\(web.bind, web.port\)"):
                service.start()
            assert service.port == 0  # the SCP was not started
        finally:
            service.close()
