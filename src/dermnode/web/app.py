"""The web console application (FastAPI, server-rendered Jinja2 pages, a few static files).

Pages: the worklist (``/``), a result (``/results/<SOPInstanceUID>``), upload (``/upload``), status
(``/status``) and login. :func:`create_app` builds the ASGI application for one node; ``dermnode serve`` runs it
with uvicorn (:mod:`dermnode.web.server`).

Access (see docs/web-console.md): on a loopback address without configured authentication everyone on this machine
is the local administrator (and the Host header must name loopback: no DNS rebinding); otherwise every page but
the login page and the static files needs a session (users with salted password hashes) or the bearer token.
No page, error or redirect shows patient data to an unauthenticated request. Every POST carries the session's
CSRF token and, when the browser sends an Origin, it must be this console's. Each result viewed or downloaded
leaves a line in the ``dermnode.audit`` log (who, which SOP Instance UID; never patient data).
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import logging
import threading
import time
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, PlainTextResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.middleware.base import BaseHTTPMiddleware, RequestResponseEndpoint

from dermnode import __version__
from dermnode.dicom_io.uids import is_valid_uid
from dermnode.errors import DermnodeError
from dermnode.metrics import StageMetrics, health_document, render_metrics
from dermnode.scp.spool import Spool
from dermnode.settings import Settings, is_loopback
from dermnode.vocabulary import DIAGNOSES, IsicClass
from dermnode.web.auth import LOCAL, SESSION_COOKIE, Authenticator, Principal, csrf_ok
from dermnode.web.ingest import Accepted, Ingest, Outcome, Refused, check_patient_id, parse_pixel_spacing
from dermnode.web.state import BANDS, STATUSES, ConsoleState
from dermnode.workqueue.db import state_db_of
from dermnode.workqueue.jobs import JobQueue
from dermnode.workqueue.workers import PoolHealth

logger = logging.getLogger(__name__)
audit = logging.getLogger("dermnode.audit")

HERE = Path(__file__).resolve().parent
#: Paths served without a login (they show no patient data).
PUBLIC_PREFIXES = ("/static/",)
PUBLIC_PATHS = ("/login", "/favicon.ico")
#: Failed logins per user name before a pause, and the pause.
LOGIN_FAILURES_ALLOWED, LOGIN_LOCKOUT_S = 5, 300.0
LOGIN_CLIENT_FAILURES_ALLOWED = 20  # failed logins from one client address, whatever the names
LOGIN_TRACKED_MAX = 10_000  # names (and, apart, client addresses) with failures kept in memory

ASGIApp = Callable[[MutableMapping[str, Any], Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[None]]],
                   Awaitable[None]]

BAND_MEANINGS = {
    "benign": "The melanoma probability is below the benign cut-off: the model finds little sign of melanoma. "
    "This does not rule melanoma out; the lesion still needs clinical judgement.",
    "indeterminate": "The melanoma probability lies between the cut-offs: the model cannot tell. The lesion needs "
    "a dermatologist's review (follow-up or excision as clinically indicated).",
    "malignant": "The melanoma probability is above the malignant cut-off: the model finds features it associates "
    "with melanoma. Refer for prompt clinical assessment.",
}
SPACING_SOURCES = {
    "PixelSpacing": "the image's Pixel Spacing",
    "ImagerPixelSpacing": "the image's Imager Pixel Spacing",
    "DeviceCalibration": "the device calibration table (analysis.calibrations)",
}
DISCLAIMER = (
    "These results come from models trained on public research data "
    "(ISIC); their performance on this device and population is unknown until measured here. A clinician must "
    "review every result."
)


class _LoginThrottle:
    """Failed logins, counted per user name and per client address.

    A name with :data:`LOGIN_FAILURES_ALLOWED` recent failures (from anywhere) is paused, and so is a client with
    :data:`LOGIN_CLIENT_FAILURES_ALLOWED` recent failures (whatever names it tried), for :data:`LOGIN_LOCKOUT_S`.
    Memory is bounded: past :data:`LOGIN_TRACKED_MAX` keys, expired entries go first, then the least recently
    failed ones that are not paused, and a paused key only when nothing else is left -- a flood of invented names
    never lifts the pause of the name under attack.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._names: dict[str, list[float]] = {}
        self._clients: dict[str, list[float]] = {}

    @staticmethod
    def _recent(table: dict[str, list[float]], key: str, now: float) -> int:
        times = table.get(key)
        if times is None:
            return 0
        recent = [t for t in times if now - t < LOGIN_LOCKOUT_S]
        if recent:
            table[key] = recent
        else:
            del table[key]
        return len(recent)

    def blocked(self, name: str, client: str) -> bool:
        now = time.monotonic()
        with self._lock:
            return (self._recent(self._names, name, now) >= LOGIN_FAILURES_ALLOWED
                    or self._recent(self._clients, client, now) >= LOGIN_CLIENT_FAILURES_ALLOWED)

    def failed(self, name: str, client: str) -> None:
        now = time.monotonic()
        with self._lock:
            for table, key, allowed in ((self._names, name, LOGIN_FAILURES_ALLOWED),
                                        (self._clients, client, LOGIN_CLIENT_FAILURES_ALLOWED)):
                times = table.pop(key, [])  # re-inserted last: the dict's order is least recently failed first
                times.append(now)
                table[key] = times[-allowed:]  # more than the limit is never needed
                if len(table) > LOGIN_TRACKED_MAX:
                    self._evict(table, allowed, now)

    def succeeded(self, name: str) -> None:
        with self._lock:
            self._names.pop(name, None)

    def size(self) -> int:
        """How many names and clients are tracked."""
        with self._lock:
            return len(self._names) + len(self._clients)

    @staticmethod
    def _evict(table: dict[str, list[float]], allowed: int, now: float) -> None:
        target = LOGIN_TRACKED_MAX * 9 // 10  # some headroom, so eviction does not run on every failure
        for key in [k for k, times in table.items() if now - times[-1] >= LOGIN_LOCKOUT_S]:
            del table[key]
        if len(table) <= target:
            return
        paused = {k for k, times in table.items() if sum(now - t < LOGIN_LOCKOUT_S for t in times) >= allowed}
        for key in [k for k in table if k not in paused][: len(table) - target]:
            del table[key]
        for key in list(table)[: max(0, len(table) - target)]:  # only paused keys left: the oldest go
            del table[key]


@dataclass
class Console:
    """What the routes share."""

    settings: Settings
    state: ConsoleState
    ingest: Ingest
    auth: Authenticator
    templates: Jinja2Templates
    health: Callable[[], PoolHealth] | None
    stages: StageMetrics | None
    throttle: _LoginThrottle
    anonymous_local: bool

    @property
    def max_request_bytes(self) -> int:
        web = self.settings.web
        return web.max_upload_mb * 1_048_576 * web.max_upload_files + 1_048_576


def _console(request: Request) -> Console:
    console: Console = request.app.state.console
    return console


def _principal(request: Request) -> Principal:
    principal: Principal = request.state.principal
    return principal


def _session(request: Request) -> dict[str, object]:
    session: dict[str, object] = request.state.session
    return session


# -- formatting helpers for the templates ------------------------------------------------------------------------
def _ts(value: float | None) -> str:
    if not value:
        return "—"
    return dt.datetime.fromtimestamp(value).strftime("%Y-%m-%d %H:%M:%S")


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{value * 100:.1f} %"


def _num(value: object, digits: int = 2) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return "—"
    return f"{value:.{digits}f}"


def _g(value: object) -> str:
    """A number as reported (result.json is already rounded like the SR): no trailing zeros."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return "—"
    return f"{value:g}"


def _host_allowed(host_header: str, bind: str) -> bool:
    host = host_header.strip().lower()
    if host.startswith("["):
        host = host[1 : host.find("]")] if "]" in host else host
    else:
        host = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    return host in ("localhost", bind.lower()) or is_loopback(host)


class _ConsoleMiddleware(BaseHTTPMiddleware):
    """Session, authentication, Origin check, PHI-safe refusals and security headers on every response."""

    async def dispatch(self, request: Request, call_next: RequestResponseEndpoint) -> Response:
        console = _console(request)
        path = request.url.path
        if console.anonymous_local and not _host_allowed(request.headers.get("host", ""), console.settings.web.bind):
            return PlainTextResponse("this console answers only to a loopback host name", status_code=400)
        session = console.auth.decode_session(request.cookies.get(SESSION_COOKIE))
        fresh = not session
        if fresh:
            session = console.auth.new_session(None)
        request.state.session = session
        request.state.new_session = None
        principal: Principal | None = console.auth.bearer(request.headers.get("authorization"))
        request.state.via_bearer = principal is not None
        if principal is None and request.headers.get("authorization"):
            return self._secure(
                PlainTextResponse("invalid bearer token", status_code=401, headers={"WWW-Authenticate": "Bearer"}),
                request,
            )
        if principal is None:
            principal = console.auth.principal_of(session) if console.auth.required else LOCAL
        request.state.principal = principal
        if request.method == "POST" and not request.state.via_bearer:
            origin = request.headers.get("origin")
            if origin and origin != "null" and urlsplit(origin).netloc != request.headers.get("host", ""):
                audit.warning("web: cross-origin POST to %s refused (origin %s)", path, ascii(origin))
                return self._secure(PlainTextResponse("cross-origin request refused", status_code=403), request)
        public = path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES)
        if principal is None and not public:
            if request.method == "GET" and "text/html" in request.headers.get("accept", ""):
                target = path + (f"?{request.url.query}" if request.url.query else "")
                response: Response = RedirectResponse("/login?" + urlencode({"next": target}), status_code=303)
            else:
                response = PlainTextResponse("authentication required", status_code=401)
        else:
            response = await call_next(request)
        new_session = request.state.new_session
        if new_session is not None:
            session, fresh = new_session, True
        if fresh and not request.state.via_bearer:
            web = console.settings.web
            response.set_cookie(
                SESSION_COOKIE,
                console.auth.encode_session(session),
                max_age=int(web.session_max_age_s),
                httponly=True,
                samesite="strict",
                secure=request.url.scheme == "https" or web.secure_cookies or bool(web.tls_certificate),
                path="/",
            )
        return self._secure(response, request)

    @staticmethod
    def _secure(response: Response, request: Request) -> Response:
        h = response.headers
        h.setdefault(
            "Content-Security-Policy",
            "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; object-src 'none'; "
            "frame-ancestors 'none'; form-action 'self'; base-uri 'none'",
        )
        h.setdefault("X-Content-Type-Options", "nosniff")
        h.setdefault("Referrer-Policy", "no-referrer")
        h.setdefault("X-Frame-Options", "DENY")
        if not request.url.path.startswith("/static/"):
            h.setdefault("Cache-Control", "no-store")  # pages and files hold patient data
        return response


class BodyLimit:
    """Refuse a request body above ``limit`` bytes with 413, by Content-Length or while it streams in."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def _refuse(self, send: Callable[[Any], Awaitable[None]]) -> None:
        body = (
            "<!doctype html><html lang=en><meta charset=utf-8><title>Upload refused</title>"
            "<main><h1>Upload refused: too large</h1><p>The upload is larger than "
            f"{self.limit / 1_048_576:.0f} MB (web.max_upload_mb per file, web.max_upload_files files). Nothing "
            "was stored.</p><p><a href=\"/upload\">Back to upload</a></p></main></html>"
        ).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"text/html; charset=utf-8"), (b"connection", b"close"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    async def __call__(
        self, scope: MutableMapping[str, Any], receive: Callable[[], Awaitable[Any]],
        send: Callable[[Any], Awaitable[None]],
    ) -> None:
        if scope["type"] != "http" or scope.get("method") != "POST":
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers", [])).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            await self._refuse(send)
            return
        received = 0
        started = False  # the app's response has begun (forwarded to the client)
        overflow = False  # the body went over the limit: reading stopped
        refusing = False  # ... before the app answered: its response is dropped, the 413 page goes out instead

        async def limited_receive() -> Any:
            # Over the limit, stop reading and tell the app the client went away: whatever the app (or Starlette's
            # ServerErrorMiddleware) then does -- a ClientDisconnect, a 500 -- is dropped below and the client gets
            # the refusal page.
            nonlocal received, overflow, refusing
            if overflow:
                return {"type": "http.disconnect"}
            message = await receive()
            if message.get("type") == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    overflow, refusing = True, not started
                    return {"type": "http.disconnect"}
            return message

        async def tracking_send(message: Any) -> None:
            nonlocal started
            if refusing:
                return
            if message.get("type") == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except Exception:
            if not overflow:
                raise
            logger.warning("web: request body to %s over %d bytes refused while it streamed in",
                           scope.get("path", "?"), self.limit)
        if refusing:
            await self._refuse(send)


def _render(request: Request, name: str, context: dict[str, Any], status_code: int = 200) -> Response:
    console = _console(request)
    principal = request.state.principal
    base = {
        "principal": principal,
        "auth_required": console.auth.required,
        "csrf": _session(request).get("csrf", "") if request.state.new_session is None
        else request.state.new_session.get("csrf", ""),
        "version": __version__,
        "disclaimer": DISCLAIMER,
        "ts": _ts,
        "pct": _pct,
        "num": _num,
        "g": _g,
        "path": request.url.path,
    }
    base.update(context)
    return console.templates.TemplateResponse(request, name, base, status_code=status_code)


async def _form_with_csrf(request: Request, **limits: int) -> tuple[Any, bool]:
    """The posted form and whether its CSRF token is right. Only the upload takes files (``max_files``; it closes
    the form): elsewhere a file part is refused (400), so no spooled temporary file is left open."""
    limits.setdefault("max_files", 0)
    form = await request.form(**limits)
    token = form.get("csrf_token")
    ok = request.state.via_bearer or csrf_ok(_session(request), token if isinstance(token, str) else None)
    if not ok:
        audit.warning("web: POST %s by %s refused: missing or wrong CSRF token", request.url.path,
                      getattr(request.state.principal, "name", "anonymous"))
    return form, ok


def _csrf_refused(request: Request) -> Response:
    return _render(request, "error.html", {"title": "Request refused",
                                           "message": "The form was stale or did not come from this console "
                                                      "(CSRF check). Reload the page and try again."},
                   status_code=403)


def _not_found(request: Request) -> Response:
    return _render(request, "error.html", {"title": "Not found",
                                           "message": "There is no job or result for this SOP Instance UID."},
                   status_code=404)


def create_app(
    settings: Settings,
    *,
    spool: Spool | None = None,
    queue: JobQueue | None = None,
    health: Callable[[], PoolHealth] | None = None,
    stages: StageMetrics | None = None,
) -> FastAPI:
    """The console for one node.

    Parameters
    ----------
    settings:
        The validated settings (``storage.root``, ``web``, ``delivery``).
    spool, queue:
        The service's spool and job queue, which uploads go into (default: opened on ``storage.root``).
    health, stages:
        The service's thread liveness and stage latencies for the status page (``None``: not shown).

    Raises
    ------
    ConfigError
        When ``web.users_file`` cannot be read.
    StorageError
        When the state database cannot be opened.
    """
    root = settings.storage_root
    web = settings.web
    shared = state_db_of(settings) if settings.state.backend == "postgresql" else None
    state = ConsoleState(root, settings.delivery, queue.db_path if queue is not None else shared)
    spool = spool if spool is not None else Spool(root, settings.storage.min_free_mb, fsync=settings.storage.fsync)
    queue = queue if queue is not None else state.queue
    auth = Authenticator(web)
    templates = Jinja2Templates(directory=str(HERE / "templates"))
    console = Console(
        settings=settings,
        state=state,
        ingest=Ingest(spool, queue, root / "web-uploads", web.max_upload_mb * 1_048_576),
        auth=auth,
        templates=templates,
        health=health,
        stages=stages,
        throttle=_LoginThrottle(),
        anonymous_local=not auth.required,
    )
    app = FastAPI(title="dermnode console", version=__version__, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.console = console
    app.add_middleware(_ConsoleMiddleware)
    app.mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")
    _routes(app)
    return app


def asgi_app(app: FastAPI) -> ASGIApp:
    """``app`` behind the request-size limit (what uvicorn serves)."""
    console: Console = app.state.console
    return BodyLimit(app, console.max_request_bytes)


def _routes(app: FastAPI) -> None:
    @app.get("/favicon.ico", include_in_schema=False)
    def favicon() -> Response:
        return Response(status_code=204)

    # -- login ----------------------------------------------------------------------------------------------
    @app.get("/login", response_class=HTMLResponse)
    def login_page(request: Request, next: str = "/") -> Response:
        if not _console(request).auth.required or request.state.principal is not None:
            return RedirectResponse(_safe_next(next), status_code=303)
        return _render(request, "login.html", {"next": _safe_next(next), "error": ""})

    @app.post("/login", response_class=HTMLResponse)
    async def login(request: Request) -> Response:
        console = _console(request)
        form, ok = await _form_with_csrf(request)
        if not ok:
            return _csrf_refused(request)
        name = str(form.get("username", ""))[:200]
        password = str(form.get("password", ""))[:1000]
        target = _safe_next(str(form.get("next", "/")))
        client = request.client.host if request.client else "?"
        if console.throttle.blocked(name, client):
            audit.warning("web: login for %s from %s refused: too many failures", _shown_name(console, name), client)
            return _render(request, "login.html", {"next": target, "error": "Too many failed attempts: wait a few "
                                                   "minutes."}, status_code=429)
        principal = await run_in_threadpool(console.auth.login, name, password)  # scrypt: off the event loop
        if principal is None:
            console.throttle.failed(name, client)
            audit.warning("web: failed login for %s from %s", _shown_name(console, name), client)
            return _render(request, "login.html", {"next": target, "error": "Wrong user name or password."},
                           status_code=401)
        console.throttle.succeeded(name)
        audit.info("web: %s (%s) logged in from %s", principal.name, principal.role, client)
        request.state.new_session = console.auth.new_session(principal)  # new token: no session fixation
        return RedirectResponse(target, status_code=303)

    @app.post("/logout")
    async def logout(request: Request) -> Response:
        _form, ok = await _form_with_csrf(request)
        if not ok:
            return _csrf_refused(request)
        audit.info("web: %s logged out", _principal(request).name)
        request.state.new_session = _console(request).auth.new_session(None)
        return RedirectResponse("/login", status_code=303)

    # -- worklist -----------------------------------------------------------------------------------------
    @app.get("/", response_class=HTMLResponse)
    def worklist(
        request: Request, status: str = "", band: str = "", q: str = "", page: int = 1
    ) -> Response:
        console = _console(request)
        status = status if status in STATUSES else ""
        band = band if band in BANDS else ""
        q = q.strip()[:64]
        result = console.state.worklist(
            status=status, band=band, search=q, page=page, page_size=console.settings.web.page_size
        )
        destinations = [f"pacs:{p.name}" for p in console.settings.pacs]
        if console.settings.fhir.base_url:
            destinations.append("fhir")
        query = {k: v for k, v in (("status", status), ("band", band), ("q", q)) if v}
        context = {
            "page": result,
            "statuses": STATUSES,
            "bands": BANDS,
            "status": status,
            "band": band,
            "q": q,
            "query": query,
            "urlencode": urlencode,
            "destinations": destinations,
            "refresh_s": console.settings.web.refresh_s,
            "counts": console.state.counts(),
        }
        name = "worklist_rows.html" if request.headers.get("x-fragment") == "rows" else "worklist.html"
        response = _render(request, name, context)
        response.headers["X-Dermnode-Live"] = "1" if result.live else "0"
        return response

    # -- a result -----------------------------------------------------------------------------------------
    @app.get("/results/{uid}", response_class=HTMLResponse)
    def result_page(request: Request, uid: str, replayed: int | None = None) -> Response:
        console = _console(request)
        view = console.state.view(uid) if is_valid_uid(uid) else None
        if view is None:
            return _not_found(request)
        audit.info("web: %s viewed the result of sop_instance=%s", _principal(request).name, uid)
        result = view.result or {}
        classification = result.get("classification") or {}
        probabilities = classification.get("diagnosis_probabilities") or {}
        names = {c.value: DIAGNOSES[IsicClass(c)].display for c in IsicClass}
        bars = sorted(
            ((code, names.get(code, code), float(p)) for code, p in probabilities.items()),
            key=lambda item: -item[2],
        )
        spacing = result.get("pixel_spacing_mm")
        band = classification.get("band") or ""
        context = {
            "view": view,
            "result": result,
            "classification": classification,
            "measurements": result.get("measurements") or {},
            "quality": result.get("quality") or {},
            "bars": bars,
            "spacing": spacing,
            "spacing_source": SPACING_SOURCES.get((spacing or {}).get("source", ""), (spacing or {}).get("source")),
            "band": band,
            "band_meaning": classification.get("band_meaning") or BAND_MEANINGS.get(band, ""),
            "replayed": replayed,
            "waiting": view.status in ("queued", "running"),
            "statuses": STATUSES,
        }
        return _render(request, "result.html", context)

    @app.get("/results/{uid}/state")
    def result_state(request: Request, uid: str) -> Response:
        view = _console(request).state.view(uid) if is_valid_uid(uid) else None
        if view is None:
            return JSONResponse({"status": None}, status_code=404)
        return JSONResponse({"status": view.status, "result": view.result is not None})

    @app.get("/results/{uid}/image/{which}")
    def result_image(request: Request, uid: str, which: str) -> Response:
        state = _console(request).state
        overlay = state.result_file(uid, "overlay.png")
        if which == "overlay.png" and overlay is not None:
            return FileResponse(overlay, media_type="image/png")
        if which == "source.png":
            size = None
            if overlay is not None:
                from PIL import Image

                with Image.open(overlay) as im:
                    size = im.size
            data = state.source_png(uid, size)
            if data is not None:
                return Response(data, media_type="image/png")
        return PlainTextResponse("no such image", status_code=404)

    @app.get("/results/{uid}/files/{name}")
    def result_download(request: Request, uid: str, name: str) -> Response:
        state = _console(request).state
        if name == "source.dcm":
            path = state.source_file(uid)
            media = "application/dicom"
            filename = f"{uid}.dcm"
        else:
            path = state.result_file(uid, name)
            media = {"seg.dcm": "application/dicom", "sr.dcm": "application/dicom",
                     "pr.dcm": "application/dicom", "key-image.dcm": "application/dicom",
                     "diagnostic-report.json": "application/fhir+json", "result.json": "application/json",
                     "overlay.png": "image/png"}.get(name, "application/octet-stream")
            filename = f"{uid}-{name}"
        if path is None:
            return PlainTextResponse("no such file", status_code=404)
        audit.info("web: %s downloaded %s of sop_instance=%s", _principal(request).name, name, uid)
        return FileResponse(path, media_type=media, filename=filename)

    @app.post("/results/{uid}/replay")
    async def replay(request: Request, uid: str) -> Response:
        console = _console(request)
        form, ok = await _form_with_csrf(request)
        if not ok:
            return _csrf_refused(request)
        principal = _principal(request)
        if not principal.is_admin:
            audit.warning("web: %s (not an admin) tried to replay work of sop_instance=%s", principal.name, uid)
            return _render(request, "error.html", {"title": "Not allowed",
                                                   "message": "Only an administrator can replay dead-lettered "
                                                              "work."}, status_code=403)
        if not is_valid_uid(uid):
            return _not_found(request)
        try:
            letter = int(str(form.get("dead_letter", "")))
        except ValueError:
            return PlainTextResponse("dead_letter must be a number", status_code=400)
        n = await run_in_threadpool(console.state.replay, uid, letter)
        audit.info("web: %s replayed dead letter %d of sop_instance=%s (%d re-queued)", principal.name, letter, uid, n)
        return RedirectResponse(f"/results/{uid}?replayed={n}", status_code=303)

    # -- upload -------------------------------------------------------------------------------------------
    @app.get("/upload", response_class=HTMLResponse)
    def upload_page(request: Request) -> Response:
        return _render(request, "upload.html", _upload_context(request, [], "", ""))

    @app.post("/upload", response_class=HTMLResponse)
    async def upload(request: Request) -> Response:
        console = _console(request)
        web = console.settings.web
        form, ok = await _form_with_csrf(request, max_files=web.max_upload_files, max_fields=20)
        try:
            if not ok:
                return _csrf_refused(request)
            patient_id = str(form.get("patient_id", "")).strip()
            spacing_text = str(form.get("pixel_spacing", ""))
            files = [f for f in form.getlist("files") if isinstance(f, UploadFile) and (f.filename or f.size)]
            problem = check_patient_id(patient_id)
            spacing, spacing_problem = parse_pixel_spacing(spacing_text)
            outcomes: list[Outcome] = []
            if not files:
                problem = problem or "choose at least one file"
            if problem or spacing_problem:
                reason = problem or spacing_problem or ""
                outcomes = [Refused(f.filename or "upload", reason) for f in files] or [Refused("—", reason)]
            else:
                principal = _principal(request)
                client = request.client.host if request.client else "?"
                for f in files:
                    data = await f.read(web.max_upload_mb * 1_048_576 + 1)
                    outcome = await run_in_threadpool(  # wrap, fsync, queue: off the event loop
                        functools.partial(
                            console.ingest.accept, f.filename or "upload", data, patient_id=patient_id,
                            pixel_spacing_mm=spacing, user=principal.name, client=client,
                        )
                    )
                    outcomes.append(outcome)
        finally:
            await form.close()  # its spooled temporary files, whatever happened
        accepted = [o for o in outcomes if isinstance(o, Accepted)]
        if len(outcomes) == 1 and accepted:
            return RedirectResponse(f"/results/{accepted[0].sop_instance_uid}", status_code=303)
        status_code = 200 if accepted else (413 if any("too large" in o.reason for o in outcomes
                                                        if isinstance(o, Refused)) else 422)
        return _render(request, "upload.html", _upload_context(request, outcomes, patient_id, spacing_text),
                       status_code=status_code)

    # -- status -------------------------------------------------------------------------------------------
    @app.get("/status", response_class=HTMLResponse)
    def status_page(request: Request) -> Response:
        console = _console(request)
        state = console.state
        pool = console.health() if console.health is not None else None
        try:
            code, health = health_document(state.queue, state.outbox, pool)
        except DermnodeError as exc:
            code, health = 503, {"status": "error", "error": str(exc)}
        metrics_text = ""
        stages: list[tuple[str, int, float]] = []
        outcomes: dict[str, int] = {}
        if console.stages is not None:
            metrics_text = render_metrics(state.queue, state.outbox, console.stages, pool)
            sums, counts, outcomes = console.stages.snapshot()
            stages = [(k, counts[k], sums[k] / counts[k] * 1000.0) for k in sorted(counts) if counts[k]]
        context = {
            "health_code": code,
            "health": health,
            "health_json": json.dumps(health, indent=2),
            "counts": state.counts(),
            "stages": stages,
            "outcomes": outcomes,
            "metrics_text": metrics_text,
            "settings": console.settings,
        }
        return _render(request, "status.html", context)


def _shown_name(console: Console, name: str) -> str:
    """A user name for the audit log: a known name as is, anything else (maybe a mistyped password) not."""
    return ascii(name) if name in console.auth.users else "an unknown user name"


def _safe_next(target: str) -> str:
    """Only a path on this console (no scheme, no host, no ``//``) may follow a login."""
    if not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    return target


def _upload_context(request: Request, outcomes: list[Outcome], patient_id: str, spacing: str) -> dict[str, Any]:
    web = _console(request).settings.web
    return {
        "outcomes": outcomes,
        "accepted": [o for o in outcomes if isinstance(o, Accepted)],
        "refused": [o for o in outcomes if isinstance(o, Refused)],
        "patient_id": patient_id,
        "pixel_spacing": spacing,
        "max_upload_mb": web.max_upload_mb,
        "max_upload_files": web.max_upload_files,
    }
