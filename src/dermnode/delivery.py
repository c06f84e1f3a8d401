"""Deliverers: how each kind of outbox entry reaches its destination (PACS by C-STORE, EHR by FHIR REST).

DICOM deliveries are sent in batches (:class:`~dermnode.workqueue.outbox.BatchDeliverer`): the outbox hands over up
to :data:`~dermnode.workqueue.outbox.MAX_BATCH` due deliveries of one PACS (those of one job first) and they are
stored over one association, each with its own outcome (:func:`~dermnode.dicom_io.sender.send_each`). FHIR
bundles are posted one per call.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence

from dermnode.dicom_io.sender import send_each
from dermnode.errors import DeliveryError
from dermnode.fhir.client import FhirClient
from dermnode.settings import Settings
from dermnode.workqueue.outbox import BatchDeliverer, Deliverer, Delivery

logger = logging.getLogger(__name__)


def build_deliverers(settings: Settings) -> dict[str, Deliverer]:
    """Delivery functions by kind for the configured destinations."""
    destinations = {f"pacs:{p.name}": p for p in settings.pacs}

    def deliver_dicom(deliveries: Sequence[Delivery]) -> list[DeliveryError | None]:
        outcomes: list[DeliveryError | None] = [None] * len(deliveries)
        by_destination: dict[str, list[int]] = {}  # one association per destination (the outbox sends one)
        for i, delivery in enumerate(deliveries):
            by_destination.setdefault(delivery.destination, []).append(i)
        for name, indexes in by_destination.items():
            dest = destinations.get(name)
            if dest is None:
                gone = DeliveryError(f"destination {name} is no longer configured", permanent=True)
                for i in indexes:
                    outcomes[i] = gone
                continue
            calling_aet = dest.calling_ae_title or settings.scp.ae_title
            sent = send_each(dest, calling_aet, [deliveries[i].path for i in indexes])
            for i, outcome in zip(indexes, sent, strict=True):
                outcomes[i] = outcome
        return outcomes

    deliverers: dict[str, Deliverer] = {"dicom": BatchDeliverer(deliver_dicom)}
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
