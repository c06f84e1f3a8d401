"""A tiny FHIR-like HTTP server on loopback for delivery tests (reusable by the outbox tests).

It accepts ``POST <base>`` with a transaction Bundle, implements conditional create (``ifNoneExist`` with
``identifier=system|value``) and ``urn:uuid:`` reference resolution, stores the resources in memory, records
every request, and can be told to misbehave:

``mode``
    ``"ok"`` (default), an HTTP status such as ``"503"`` or ``"400"`` (answered with an OperationOutcome),
    ``"slow"`` (sleeps ``slow_s`` before answering) or ``"down"`` (the listening socket is closed, so
    connections are refused; setting another mode starts it again on the same port).
``fail_times``
    With an error mode, answer that many requests with the error, then switch back to ``"ok"``.
``token``
    When set, requests without ``Authorization: Bearer <token>`` get HTTP 401.

Usage::

    with FhirTestServer() as server:
        client = FhirClient(FhirSettings(base_url=server.url))
        ...
        assert server.requests[0].headers["Content-Type"].startswith("application/fhir+json")
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote


@dataclass
class RecordedRequest:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    json: Any = None


@dataclass
class _State:
    mode: str = "ok"
    fail_times: int | None = None
    slow_s: float = 2.0
    token: str | None = None
    requests: list[RecordedRequest] = field(default_factory=list)
    resources: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)


def _split_token(token: str) -> tuple[str, str]:
    """``system|value`` with FHIR backslash escapes (``\\|``) honoured."""
    token = unquote(token)
    parts: list[str] = [""]
    i = 0
    while i < len(token):
        ch = token[i]
        if ch == "\\" and i + 1 < len(token):
            parts[-1] += token[i + 1]
            i += 2
            continue
        if ch == "|" and len(parts) == 1:
            parts.append("")
        else:
            parts[-1] += ch
        i += 1
    return (parts[0], parts[1]) if len(parts) == 2 else ("", parts[0])


def _outcome(code: str, text: str) -> dict[str, Any]:
    return {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": "error", "code": code, "diagnostics": text}],
    }


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        return

    def _send(self, status: int, body: dict[str, Any] | None, headers: dict[str, str] | None = None) -> None:
        raw = b"" if body is None else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/fhir+json")
        self.send_header("Content-Length", str(len(raw)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(raw)

    def do_GET(self) -> None:
        self._record(b"")
        if self.path.rstrip("/").endswith("metadata"):
            self._send(200, {"resourceType": "CapabilityStatement", "status": "active", "kind": "instance"})
        else:
            self._send(404, _outcome("not-found", "only POST transaction and GET metadata are supported"))

    def _record(self, body: bytes) -> RecordedRequest:
        try:
            parsed = json.loads(body) if body else None
        except json.JSONDecodeError:
            parsed = None
        rec = RecordedRequest(self.command, self.path, dict(self.headers.items()), body, parsed)
        with self.server.state.lock:
            self.server.state.requests.append(rec)
        return rec

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length", "0") or 0)
        body = self.rfile.read(length) if length else b""
        rec = self._record(body)
        st = self.server.state
        with st.lock:
            mode = st.mode
            if mode.isdigit() and st.fail_times is not None:
                st.fail_times -= 1
                if st.fail_times <= 0:
                    st.mode, st.fail_times = "ok", None
        if mode == "slow":
            time.sleep(st.slow_s)
        elif mode.isdigit():
            status = int(mode)
            self._send(status, _outcome("transient" if status >= 500 else "invalid", f"test server says {status}"))
            return
        if st.token is not None and self.headers.get("Authorization") != f"Bearer {st.token}":
            self._send(401, _outcome("login", "missing or wrong bearer token"))
            return
        if not (self.headers.get("Content-Type", "").startswith("application/fhir+json")):
            self._send(415, _outcome("not-supported", "Content-Type must be application/fhir+json"))
            return
        bundle = rec.json
        if (
            not isinstance(bundle, dict)
            or bundle.get("resourceType") != "Bundle"
            or bundle.get("type")
            not in (
                "transaction",
                "batch",
            )
        ):
            self._send(400, _outcome("invalid", "expected a transaction Bundle"))
            return
        with st.lock:
            response = self.server.transaction(bundle)
        self._send(200, response)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], state: _State) -> None:
        super().__init__(address, _Handler)
        self.state = state

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Stay quiet when a client gave up (timeout tests); report anything else."""
        import sys

        if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            super().handle_error(request, client_address)

    def _find(self, rtype: str, query: str) -> str | None:
        for part in query.split("&"):
            key, _, value = part.partition("=")
            if key != "identifier":
                continue
            system, val = _split_token(value)
            for rid, res in self.state.resources.get(rtype, {}).items():
                for ident in res.get("identifier", []) or []:
                    if ident.get("value") == val and (not system or ident.get("system") == system):
                        return rid
        return None

    def transaction(self, bundle: dict[str, Any]) -> dict[str, Any]:
        """Apply a transaction: conditional creates first, then resolve urn:uuid references."""
        entries = bundle.get("entry", []) or []
        mapping: dict[str, str] = {}
        out: list[dict[str, Any]] = []
        created: list[tuple[str, str, dict[str, Any]]] = []
        for entry in entries:
            res = entry.get("resource", {})
            req = entry.get("request", {})
            rtype = res.get("resourceType", req.get("url", ""))
            existing = self._find(rtype, req["ifNoneExist"]) if req.get("ifNoneExist") else None
            if existing is not None:
                rid, status = existing, "200 OK"
            else:
                rid, status = uuid.uuid4().hex[:16], "201 Created"
                created.append((rtype, rid, res))
            if entry.get("fullUrl"):
                mapping[entry["fullUrl"]] = f"{rtype}/{rid}"
            out.append({"response": {"status": status, "location": f"{rtype}/{rid}/_history/1"}})

        def resolve(node: Any) -> Any:
            if isinstance(node, dict):
                return {k: (mapping.get(v, v) if k == "reference" else resolve(v)) for k, v in node.items()}
            if isinstance(node, list):
                return [resolve(v) for v in node]
            return node

        for rtype, rid, res in created:
            stored = resolve(res)
            stored["id"] = rid
            self.state.resources.setdefault(rtype, {})[rid] = stored
        return {"resourceType": "Bundle", "type": "transaction-response", "entry": out}


class FhirTestServer:
    """A FHIR-like transaction endpoint on ``127.0.0.1`` in a background thread.

    Parameters
    ----------
    port:
        Port to bind (0: any free port; the port is kept across ``mode = "down"`` and back).
    """

    def __init__(self, port: int = 0) -> None:
        self._state = _State()
        self._port = port
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # --- lifecycle ---
    def start(self) -> FhirTestServer:
        if self._server is not None:
            return self
        self._server = _Server(("127.0.0.1", self._port), self._state)
        self._port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is not None:
            server.shutdown()
            server.server_close()
        if thread is not None:
            thread.join(timeout=5)

    def __enter__(self) -> FhirTestServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- observation & control ---
    @property
    def url(self) -> str:
        """The FHIR base URL (``http://127.0.0.1:<port>/fhir``)."""
        return f"http://127.0.0.1:{self._port}/fhir"

    @property
    def requests(self) -> list[RecordedRequest]:
        with self._state.lock:
            return list(self._state.requests)

    @property
    def resources(self) -> dict[str, dict[str, dict[str, Any]]]:
        """Stored resources: ``{resourceType: {id: resource}}`` (references resolved to ``Type/id``)."""
        with self._state.lock:
            return {k: dict(v) for k, v in self._state.resources.items()}

    @property
    def mode(self) -> str:
        return "down" if self._server is None else self._state.mode

    @mode.setter
    def mode(self, value: str) -> None:
        if value == "down":
            self.stop()
            return
        with self._state.lock:
            self._state.mode = value
        if self._server is None:
            self.start()

    @property
    def fail_times(self) -> int | None:
        return self._state.fail_times

    @fail_times.setter
    def fail_times(self, value: int | None) -> None:
        with self._state.lock:
            self._state.fail_times = value

    @property
    def token(self) -> str | None:
        return self._state.token

    @token.setter
    def token(self, value: str | None) -> None:
        self._state.token = value

    @property
    def slow_s(self) -> float:
        return self._state.slow_s

    @slow_s.setter
    def slow_s(self, value: float) -> None:
        self._state.slow_s = value

    def count(self, resource_type: str) -> int:
        """Number of stored resources of ``resource_type``."""
        return len(self.resources.get(resource_type, {}))
