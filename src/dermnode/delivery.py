"""Deliverers: how each kind of outbox entry reaches its destination (PACS by C-STORE, EHR by FHIR REST)."""

from __future__ import annotations

import json
import logging

from dermnode.dicom_io.sender import send_files
from dermnode.errors import DeliveryError
from dermnode.fhir.client import FhirClient
from dermnode.settings import Settings
from dermnode.workqueue.outbox import Deliverer, Delivery

logger = logging.getLogger(__name__)


def build_deliverers(settings: Settings) -> dict[str, Deliverer]:
    """Delivery functions by kind for the configured destinations."""
    destinations = {f"pacs:{p.name}": p for p in settings.pacs}

    def deliver_dicom(delivery: Delivery) -> None:
        dest = destinations.get(delivery.destination)
        if dest is None:
            raise DeliveryError(f"destination {delivery.destination} is no longer configured", permanent=True)
        send_files(dest, dest.calling_ae_title or settings.scp.ae_title, [delivery.path])

    deliverers: dict[str, Deliverer] = {"dicom": deliver_dicom}
    if settings.fhir.base_url:
        client = FhirClient(settings.fhir)

        def deliver_fhir(delivery: Delivery) -> None:
            try:
                bundle = json.loads(delivery.path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise DeliveryError(f"bundle file unreadable: {exc}", permanent=True) from exc
            client.post_bundle(bundle)

        deliverers["fhir"] = deliver_fhir
    return deliverers
