"""Run the console with uvicorn in a background thread of ``dermnode serve``.

The listening socket is bound here, in the caller's thread, so a taken port is an immediate, clear error
(:class:`WebPortError`) before anything else starts; uvicorn then serves on that socket in its own thread with its
own event loop (it installs no signal handlers outside the main thread) until :meth:`WebServer.stop`.
uvicorn's access log is off: a worklist URL may carry a patient ID search.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading

import uvicorn

from dermnode.errors import StorageError
from dermnode.settings import WebSettings
from dermnode.web.app import ASGIApp

logger = logging.getLogger(__name__)


class WebPortError(StorageError, OSError):
    """The console's port cannot be bound (a ``dermnode: error:`` line and an :class:`OSError`)."""


def bind_socket(bind: str, port: int) -> socket.socket:
    """A listening TCP socket on ``bind``:``port`` (port 0: any free port).

    Raises
    ------
    WebPortError
        When the address cannot be resolved or the port is taken.
    """
    try:
        infos = socket.getaddrinfo(bind, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, _, _, _, address = infos[0]
    except OSError as exc:
        raise WebPortError(exc.errno, f"cannot resolve the web console address web.bind = {bind!r}: {exc}") from exc
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
        sock.set_inheritable(True)
    except OSError as exc:
        sock.close()
        raise WebPortError(
            exc.errno,
            f"cannot bind the web console port {bind}:{port} (web.bind, web.port): {exc.strerror}; another program "
            "(or another dermnode) is using it: choose another web.port, or set web.enabled = false",
        ) from exc
    return sock


class WebServer:
    """uvicorn serving ``app`` on an already bound socket, in a daemon thread.

    Parameters
    ----------
    app:
        The ASGI application (:func:`dermnode.web.app.asgi_app`).
    web:
        The console settings (bind, port, TLS).

    Raises
    ------
    WebPortError
        From the constructor, when the port cannot be bound.
    """

    def __init__(self, app: ASGIApp, web: WebSettings) -> None:
        self.web = web
        self.socket = bind_socket(web.bind, web.port)
        config = uvicorn.Config(
            app,
            log_config=None,  # dermnode's logging configuration applies
            access_log=False,  # URLs can hold a patient ID search: never logged
            lifespan="off",
            proxy_headers=False,
            server_header=False,
            timeout_graceful_shutdown=3,
            timeout_keep_alive=5,
            ssl_certfile=web.tls_certificate or None,
            ssl_keyfile=web.tls_private_key or None,
        )
        self.server = uvicorn.Server(config)
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self.socket.getsockname()[1])

    @property
    def url(self) -> str:
        scheme = "https" if self.web.tls_certificate else "http"
        host = self.web.bind if ":" not in self.web.bind else f"[{self.web.bind}]"
        return f"{scheme}://{host}:{self.port}/"

    def start(self, timeout: float = 10.0) -> None:
        """Serve in a background thread; returns once uvicorn has started (or raises when it failed to)."""
        errors: list[BaseException] = []

        def run() -> None:
            try:
                asyncio.run(self.server.serve(sockets=[self.socket]))
            except BaseException as exc:  # reported to start() or logged
                errors.append(exc)
                logger.exception("the web console stopped with an error")

        self._thread = threading.Thread(target=run, name="web-console", daemon=True)
        self._thread.start()
        waited = 0.0
        while not self.server.started and self._thread.is_alive() and waited < timeout:
            self._thread.join(0.02)
            waited += 0.02
        if not self.server.started:
            self.stop()
            detail = f": {errors[0]}" if errors else ""
            raise WebPortError(0, f"the web console did not start on {self.web.bind}:{self.port}{detail}")
        logger.info("web console at %s", self.url)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop serving (open connections get a few seconds) and close the socket."""
        self.server.should_exit = True
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
            if thread.is_alive():
                self.server.force_exit = True
                thread.join(2.0)
        self.socket.close()
