"""Deliver FHIR transaction Bundles: HTTP POST to the server base, or a file when no server is configured.

Standard library only (``urllib.request`` + ``ssl``). TLS certificates are verified (system CAs, or the PEM
bundle in ``fhir.ca_bundle``); ``fhir.verify_tls = false`` is for test servers only and logs a warning. The
bearer token is sent in the ``Authorization`` header and never logged: every message that could contain it
goes through :func:`redact`.

Error classification (for the outbox's retry logic): HTTP 4xx except 408/429 is permanent (the server refuses
this bundle, a retry sends the same bytes); 408, 429, 5xx, connection errors, timeouts and TLS handshake
failures other than certificate verification are transient. A certificate verification failure is permanent
(a configuration problem that retries cannot fix).
"""

from __future__ import annotations

import json
import logging
import ssl
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from typing import Any

from dermnode import __version__
from dermnode.errors import DeliveryError, OutputError
from dermnode.fhir.bundle import escape_search_token
from dermnode.settings import FhirSettings

logger = logging.getLogger(__name__)

FHIR_JSON = "application/fhir+json"
_MAX_BODY_IN_MESSAGE = 300
_MAX_RESPONSE_BYTES = 32 * 1024 * 1024


def redact(text: str, secret: str) -> str:
    """``text`` with every occurrence of ``secret`` replaced by ``***`` (no-op for an empty secret)."""
    return text.replace(secret, "***") if secret else text


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """Refuse redirects: a POST must not be replayed elsewhere with our bearer token."""

    def redirect_request(self, req: Any, fp: Any, code: int, msg: str, headers: Any, newurl: str) -> None:
        return None


class FhirClient:
    """POSTs transaction Bundles to ``settings.base_url``.

    Parameters
    ----------
    settings:
        FHIR settings: ``base_url`` (the server base; a transaction is a POST to the base itself),
        ``bearer_token``, ``verify_tls``, ``ca_bundle`` and ``timeout_s``.

    Raises
    ------
    OutputError
        When ``base_url`` is empty or not http(s), or the CA bundle cannot be loaded.
    """

    def __init__(self, settings: FhirSettings) -> None:
        if not settings.base_url.startswith(("http://", "https://")):
            raise OutputError("fhir.base_url must be an http:// or https:// URL to post bundles")
        self.settings = settings
        self.url = settings.base_url.rstrip("/")
        handlers: list[Any] = [_NoRedirect()]
        if self.url.startswith("https://"):
            handlers.append(urllib.request.HTTPSHandler(context=self._ssl_context()))
        self._opener = urllib.request.build_opener(*handlers)

    def _ssl_context(self) -> ssl.SSLContext:
        s = self.settings
        try:
            ctx = ssl.create_default_context(cafile=s.ca_bundle or None)
        except (OSError, ssl.SSLError) as exc:
            raise OutputError(f"cannot load fhir.ca_bundle {s.ca_bundle}: {exc}") from exc
        if not s.verify_tls:
            logger.warning("TLS certificate verification is OFF for %s (fhir.verify_tls = false)", self.url)
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        return ctx

    def _redact(self, text: str) -> str:
        return redact(text, self.settings.bearer_token)

    def post_bundle(self, bundle: dict[str, Any]) -> dict[str, Any]:
        """POST ``bundle`` to the server base and return the response Bundle.

        Parameters
        ----------
        bundle:
            A transaction (or batch) Bundle as a JSON-compatible dict.

        Returns
        -------
        dict
            The response Bundle (``transaction-response``) parsed from JSON.

        Raises
        ------
        DeliveryError
            ``permanent=True`` on HTTP 4xx other than 408/429, on a certificate verification failure and on a
            2xx answer that is not a FHIR Bundle; ``permanent=False`` on 408/429/5xx, connection errors and
            timeouts.
        """
        body = json.dumps(bundle, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        headers = {
            "Content-Type": f"{FHIR_JSON}; charset=utf-8",
            "Accept": FHIR_JSON,
            "User-Agent": f"dermnode/{__version__}",
        }
        if self.settings.bearer_token:
            headers["Authorization"] = f"Bearer {self.settings.bearer_token}"
        request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        try:
            with self._opener.open(request, timeout=self.settings.timeout_s) as resp:
                status = resp.status
                raw = resp.read(_MAX_RESPONSE_BYTES)
        except urllib.error.HTTPError as exc:
            raise self._http_error(exc, patient_identifiers(bundle)) from None
        except urllib.error.URLError as exc:
            reason = exc.reason
            if isinstance(reason, ssl.SSLCertVerificationError):
                raise DeliveryError(
                    self._redact(f"TLS certificate of {self.url} not trusted: {reason}"), permanent=True
                ) from None
            raise DeliveryError(
                self._redact(f"cannot reach FHIR server {self.url}: {reason}"), permanent=False
            ) from None
        except TimeoutError as exc:
            raise DeliveryError(
                f"FHIR server {self.url} did not answer within {self.settings.timeout_s} s", permanent=False
            ) from exc
        except (ConnectionError, OSError) as exc:
            raise DeliveryError(
                self._redact(f"connection to FHIR server {self.url} failed: {exc}"), permanent=False
            ) from None
        try:
            answer = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise DeliveryError(
                f"FHIR server {self.url} answered HTTP {status} without a JSON body", permanent=True
            ) from exc
        if not isinstance(answer, dict) or answer.get("resourceType") != "Bundle":
            raise DeliveryError(f"FHIR server {self.url} answered HTTP {status} with no Bundle", permanent=True)
        logger.info(
            "FHIR server %s accepted the transaction (HTTP %d, %d entries)",
            self.url,
            status,
            len(answer.get("entry", []) or []),
        )
        return answer

    def _http_error(self, exc: urllib.error.HTTPError, hide: Sequence[str] = ()) -> DeliveryError:
        """The error of an HTTP error answer; ``hide`` (patient identifiers) is masked in the server's text.

        Servers often echo the failing conditional create (``Patient?identifier=system|value``) in their
        OperationOutcome; that text is logged and stored in the dead letters, so the Patient ID is masked.
        """
        code = exc.code
        try:
            detail = exc.read(4096).decode("utf-8", "replace")
        except OSError:
            detail = ""
        finally:
            exc.close()
        detail = self._redact(_outcome_text(detail))
        for value in sorted(set(hide), key=len, reverse=True):
            # as sent in ifNoneExist (FHIR-escaped, then percent-encoded), and the forms a server may echo back
            escaped = escape_search_token(value)
            for form in (escape_search_token(value, percent=True), escaped, value):
                detail = redact(detail, form)
        detail = detail[:_MAX_BODY_IN_MESSAGE]
        permanent = 400 <= code < 500 and code not in (408, 429)
        kind = "refused" if permanent else "failed (will retry)"
        msg = f"FHIR transaction {kind}: HTTP {code} from {self.url}"
        if detail:
            msg += f": {detail}"
        logger.warning("%s", msg)
        return DeliveryError(msg, permanent=permanent)


def patient_identifiers(bundle: Mapping[str, Any]) -> list[str]:
    """The identifier values of the Patient resources in ``bundle`` (what must not reach a log)."""
    values: list[str] = []
    for entry in bundle.get("entry", []) or []:
        resource = entry.get("resource") if isinstance(entry, Mapping) else None
        if isinstance(resource, Mapping) and resource.get("resourceType") == "Patient":
            for ident in resource.get("identifier", []) or []:
                value = ident.get("value") if isinstance(ident, Mapping) else None
                if isinstance(value, str) and value:
                    values.append(value)
    return values


def _outcome_text(body: str) -> str:
    """The diagnostics of an OperationOutcome body, else the body itself (single line)."""
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, ValueError):
        return " ".join(body.split())
    if isinstance(data, dict) and data.get("resourceType") == "OperationOutcome":
        texts = [
            str(i.get("diagnostics") or (i.get("details") or {}).get("text") or i.get("code") or "")
            for i in data.get("issue", []) or []
            if isinstance(i, dict)
        ]
        return "; ".join(t for t in texts if t)
    return " ".join(body.split())
