"""Fixtures of the web console tests: a storage root with real jobs and results, a loopback console client."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from fastapi.testclient import TestClient
from webhelpers import base_settings, dicom_bytes, green_png, lesion_png, make_client


@pytest.fixture
def local_client(tmp_path: Path) -> Iterator[TestClient]:
    with make_client(base_settings(tmp_path / "var")) as client:
        yield client


@pytest.fixture(scope="module")
def analysed_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A storage root with three jobs the real pipeline ran: an analysed lesion (with a dead-lettered PACS
    delivery), a refused non-skin photo, and one still queued."""
    from dermnode.inference.analyzer import Analyzer
    from dermnode.pipeline import analyse_dataset
    from dermnode.scp.spool import Spool
    from dermnode.web.ingest import Ingest
    from dermnode.workqueue.db import database_path
    from dermnode.workqueue.jobs import JobQueue
    from dermnode.workqueue.outbox import Outbox

    root = tmp_path_factory.mktemp("web") / "var"
    settings = base_settings(root)
    queue = JobQueue(database_path(root))
    ingest = Ingest(Spool(root, 1, fsync=False), queue, root / "web-uploads", 50 * 1_048_576)
    analyzer = Analyzer(settings.analysis)
    outbox = Outbox(database_path(root), settings.delivery)
    for name, data, spacing in (("lesion.png", lesion_png(), 0.02), ("green.png", green_png(), None)):
        outcome = ingest.accept(name, data, patient_id="PAT-0042", pixel_spacing_mm=spacing, user="t", client="t")
        job = queue.claim("worker-0@test")
        assert job is not None and job.sop_instance_uid == outcome.sop_instance_uid  # type: ignore[union-attr]
        result, files = analyse_dataset(pydicom.dcmread(job.path), analyzer, settings, root / "results")
        queue.complete(job, result.status.value)
        if files.seg is not None and files.seg_sop_instance_uid is not None:
            outbox.add(job.id, "dicom", "pacs:main", files.seg_sop_instance_uid, files.seg)
            delivery = outbox.claim()
            assert delivery is not None
            outbox.failed(delivery, "association rejected by PACS: called AE title not recognised", permanent=True)
    ingest.accept("queued.dcm", dicom_bytes("PAT-0099"), patient_id="", pixel_spacing_mm=None, user="t", client="t")
    return root

