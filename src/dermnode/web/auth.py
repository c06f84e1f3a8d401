"""Who is using the console: salted password hashes, a bearer token, signed session cookies, CSRF tokens.

* **Passwords** are stored as ``scrypt$<n>$<r>$<p>$<salt>$<hash>`` (:func:`hash_password`, stdlib
  :func:`hashlib.scrypt`; ``pbkdf2_sha256$<iterations>$<salt>$<hash>`` is verified too) and compared in constant
  time. ``python -m dermnode.web.auth hash`` asks for a password and prints its hash for ``[[web.users]]``.
* **Sessions** are a cookie holding ``base64(json) . HMAC-SHA256`` signed with ``web.session_secret`` (a random
  per-process secret when none is configured): the user, the role, the expiry and the session's CSRF token. The
  cookie is ``HttpOnly``, ``SameSite=Strict`` and ``Secure`` over HTTPS or with ``web.secure_cookies``.
* **CSRF**: every POST carries the session's token in a form field (or the ``X-CSRF-Token`` header), compared in
  constant time (:func:`csrf_ok`); a request authenticated by the bearer token carries no ambient credential and
  needs none.
"""

from __future__ import annotations

import base64
import binascii
import getpass
import hashlib
import hmac
import json
import secrets
import sys
import time
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from dermnode.errors import ConfigError
from dermnode.settings import WEB_ROLES, WebSettings, WebUser, web_auth_configured

#: scrypt cost parameters of new hashes (n = 2**14, r = 8, p = 1: ~16 MiB, ~50 ms on this class of machine).
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1
SCRYPT_MAXMEM = 64 * 1024 * 1024
#: Name of the session cookie.
SESSION_COOKIE = "dermnode_session"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode("ascii").rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def hash_password(password: str, *, salt: bytes | None = None) -> str:
    """A salted scrypt hash of ``password`` in the ``scrypt$n$r$p$salt$hash`` form that ``web.users`` takes."""
    salt = salt if salt is not None else secrets.token_bytes(16)
    digest = hashlib.scrypt(
        password.encode("utf-8"), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P, maxmem=SCRYPT_MAXMEM, dklen=32
    )
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${_b64(salt)}${_b64(digest)}"


def verify_password(password: str, stored: str) -> bool:
    """Whether ``password`` matches the stored hash (constant-time comparison; a malformed hash never matches)."""
    parts = stored.split("$")
    try:
        if parts[0] == "scrypt" and len(parts) == 6:
            n, r, p = int(parts[1]), int(parts[2]), int(parts[3])
            salt, expected = _unb64(parts[4]), _unb64(parts[5])
            got = hashlib.scrypt(
                password.encode("utf-8"), salt=salt, n=n, r=r, p=p, maxmem=SCRYPT_MAXMEM, dklen=len(expected)
            )
        elif parts[0] == "pbkdf2_sha256" and len(parts) == 4:
            iterations = int(parts[1])
            salt, expected = _unb64(parts[2]), _unb64(parts[3])
            got = hashlib.pbkdf2_hmac("sha256", password.encode("utf-8"), salt, iterations, dklen=len(expected))
        else:
            return False
    except (ValueError, binascii.Error, MemoryError):
        return False
    return hmac.compare_digest(got, expected)


#: A hash that no password matches, verified for unknown user names (same time as a real check).
_DUMMY_HASH = hash_password("", salt=b"dermnode-dummy-s")


@dataclass(frozen=True)
class Principal:
    """An authenticated (or, on loopback without authentication, local) console user."""

    name: str
    role: str

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


#: The user of a loopback-only console without authentication.
LOCAL = Principal("local", "admin")


def load_users(web: WebSettings) -> dict[str, WebUser]:
    """``web.users`` plus the users of ``web.users_file`` (a TOML file of ``[[users]]`` tables), by name.

    Raises
    ------
    ConfigError
        When the file cannot be read or an entry is invalid (the same checks as ``web.users``).
    """
    users = {u.name: u for u in web.users}
    if not web.users_file.strip():
        return users
    path = Path(web.users_file)
    try:
        with open(path, "rb") as fh:
            doc = tomllib.load(fh)
    except OSError as exc:
        raise ConfigError(f"web.users_file: cannot read {path}: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"web.users_file: {path} is not valid TOML: {exc}") from exc
    entries = doc.get("users", [])
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"web.users_file: {path} has no [[users]] table")
    from dermnode.settings import validate_web_settings  # the same checks as inline users

    for i, entry in enumerate(entries):
        if not isinstance(entry, Mapping) or set(entry) - {"name", "password_hash", "role"}:
            raise ConfigError(f"web.users_file: users[{i}] must have name, password_hash and optionally role")
        user = WebUser(
            name=str(entry.get("name", "")),
            password_hash=str(entry.get("password_hash", "")),
            role=str(entry.get("role", "user")),
        )
        validate_web_settings(WebSettings(users=(user,)))
        if user.name in users:
            raise ConfigError(f"web.users_file: user {user.name!r} is defined twice")
        users[user.name] = user
    return users


class Authenticator:
    """Password and bearer-token checks, and the session cookie codec, for one console.

    Parameters
    ----------
    web:
        The console settings.

    Raises
    ------
    ConfigError
        When ``web.users_file`` cannot be read.
    """

    def __init__(self, web: WebSettings) -> None:
        self.required = web_auth_configured(web)
        self.users = load_users(web)
        self._token = web.bearer_token.encode("utf-8")
        self._secret = (web.session_secret or secrets.token_urlsafe(48)).encode("utf-8")
        self.max_age_s = web.session_max_age_s

    def login(self, name: str, password: str) -> Principal | None:
        """The user when name and password match, else ``None`` (an unknown name costs the same time)."""
        user = self.users.get(name)
        ok = verify_password(password, user.password_hash if user is not None else _DUMMY_HASH)
        if user is None or not ok:
            return None
        return Principal(user.name, user.role)

    def bearer(self, header: str | None) -> Principal | None:
        """The token's principal for ``Authorization: Bearer <token>``, else ``None``."""
        if not self._token or not header:
            return None
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode("utf-8"), self._token):
            return None
        return Principal("bearer-token", "admin")

    # -- session cookie -------------------------------------------------------------------------------------
    def _sign(self, payload: bytes) -> str:
        return _b64(hmac.new(self._secret, payload, hashlib.sha256).digest())

    def encode_session(self, session: Mapping[str, object]) -> str:
        """The signed cookie value of ``session`` (a JSON object)."""
        payload = json.dumps(dict(session), separators=(",", ":"), sort_keys=True).encode("utf-8")
        return f"{_b64(payload)}.{self._sign(payload)}"

    def decode_session(self, value: str | None) -> dict[str, object]:
        """The session in a cookie; ``{}`` when absent, forged, malformed or expired."""
        if not value or "." not in value or not value.isascii():  # a signed cookie is base64url: ASCII only
            return {}
        body, _, signature = value.partition(".")
        try:
            payload = _unb64(body)
        except (ValueError, binascii.Error):
            return {}
        if not hmac.compare_digest(signature.encode("ascii"), self._sign(payload).encode("ascii")):
            return {}
        try:
            doc = json.loads(payload)
        except ValueError:
            return {}
        if not isinstance(doc, dict):
            return {}
        expires = doc.get("exp")
        if not isinstance(expires, int | float) or expires < time.time():
            return {}
        return doc

    def new_session(self, principal: Principal | None) -> dict[str, object]:
        """A fresh session (new CSRF token) for ``principal`` (``None``: not logged in yet)."""
        session: dict[str, object] = {"csrf": secrets.token_urlsafe(32), "exp": int(time.time() + self.max_age_s)}
        if principal is not None:
            session["user"], session["role"] = principal.name, principal.role
        return session

    def principal_of(self, session: Mapping[str, object]) -> Principal | None:
        """The logged-in user of a session, if the user still exists with that role."""
        name, role = session.get("user"), session.get("role")
        if not isinstance(name, str) or role not in WEB_ROLES:
            return None
        user = self.users.get(name)
        if user is None or user.role != role:
            return None
        return Principal(name, str(role))


def csrf_ok(session: Mapping[str, object], submitted: str | None) -> bool:
    """Whether ``submitted`` is the session's CSRF token (constant-time)."""
    expected = session.get("csrf")
    if not isinstance(expected, str) or not expected or not submitted:
        return False
    return hmac.compare_digest(expected.encode("utf-8"), submitted.encode("utf-8"))


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m dermnode.web.auth hash [--name NAME] [--role ROLE]``: print a ``[[web.users]]`` table."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m dermnode.web.auth", description=main.__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    h = sub.add_parser("hash", help="ask for a password and print its salted scrypt hash as a [[web.users]] table")
    h.add_argument("--name", default="", help="user name for the printed table")
    h.add_argument("--role", default="user", choices=WEB_ROLES)
    args = parser.parse_args(argv)
    if sys.stdin.isatty():
        password = getpass.getpass("password: ")
        if getpass.getpass("again: ") != password:
            print("the passwords differ", file=sys.stderr)
            return 1
    else:
        password = sys.stdin.readline().rstrip("\n")
    if len(password) < 8:
        print("refusing a password shorter than 8 characters", file=sys.stderr)
        return 1
    hashed = hash_password(password)
    if args.name:
        print(f'[[web.users]]\nname = "{args.name}"\npassword_hash = "{hashed}"\nrole = "{args.role}"')
    else:
        print(hashed)
    return 0


if __name__ == "__main__":  # pragma: no cover - command-line entry
    raise SystemExit(main())
