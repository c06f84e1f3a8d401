"""What the console reads: the state database and the results folder, the same ones ``dermnode status`` reads.

Counts, one job, its deliveries and the dead letters come from the CLI's own functions
(:meth:`JobQueue.counts`, :meth:`JobQueue.get`, :meth:`JobQueue.dead_letters`, :meth:`Outbox.counts`,
:meth:`Outbox.for_job`); replays call :meth:`JobQueue.replay` and :meth:`Outbox.replay` exactly as
``dermnode replay`` does. The worklist needs one query the CLI has no function for (recent jobs, newest first),
made here read-only.

Patient ID, accession number and study date are read from the header of the spooled instance (pixels are not
read) and the band and melanoma probability from ``result.json``; both are cached in memory by file and
modification time, never written anywhere (a pruned spool file leaves no patient data behind).
"""

from __future__ import annotations

import io
import json
import logging
import threading
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom

from dermnode.dicom_io.uids import is_valid_uid
from dermnode.settings import DeliverySettings
from dermnode.workqueue.db import Row as StateRow
from dermnode.workqueue.db import StateConnection, StateDB, database_path
from dermnode.workqueue.jobs import JobQueue
from dermnode.workqueue.outbox import Outbox

logger = logging.getLogger(__name__)

#: The statuses the worklist shows and filters by, in display order, with their labels.
STATUSES: dict[str, str] = {
    "queued": "queued",
    "running": "running",
    "analysed": "analysed",
    "not_analysable": "not analysable",
    "dead": "dead-lettered",
}
BANDS: tuple[str, ...] = ("benign", "indeterminate", "malignant")
#: Output files of a result folder the console serves, with their media types.
RESULT_FILES: dict[str, str] = {
    "seg.dcm": "application/dicom",
    "sr.dcm": "application/dicom",
    "pr.dcm": "application/dicom",  # Color Softcopy Presentation State (the outline over the source image)
    "key-image.dcm": "application/dicom",  # key image with the outline burned in (output.burned_in_image)
    "diagnostic-report.json": "application/fhir+json",
    "result.json": "application/json",
    "overlay.png": "image/png",
}


def job_status(state: str, outcome: str | None) -> str:
    """The worklist status of a job row (one of :data:`STATUSES`)."""
    if state == "pending":
        return "queued"
    if state == "running":
        return "running"
    if state == "dead":
        return "dead"
    return "not_analysable" if outcome == "not_analysable" else "analysed"


@dataclass(frozen=True)
class Header:
    """The identifying attributes of a spooled instance (PHI: shown to signed-in users only)."""

    patient_id: str = ""
    accession_number: str = ""
    study_date: str = ""
    available: bool = False  # False: the spool copy is gone (pruned) or unreadable

    @property
    def study_date_display(self) -> str:
        d = self.study_date
        return f"{d[:4]}-{d[4:6]}-{d[6:8]}" if len(d) == 8 and d.isdigit() else d


@dataclass(frozen=True)
class Delivery:
    destination: str
    kind: str
    object_key: str
    state: str
    attempts: int
    last_error: str | None


@dataclass(frozen=True)
class DestinationSummary:
    """The deliveries of one job to one destination, summed up in a word."""

    destination: str
    state: str  # "sent" | "sending" | "queued" | "retrying" | "dead-lettered"
    done: int
    total: int


def summarise(deliveries: Iterable[Delivery]) -> list[DestinationSummary]:
    by_dest: dict[str, list[Delivery]] = {}
    for d in deliveries:
        by_dest.setdefault(d.destination, []).append(d)
    out = []
    for dest, items in by_dest.items():
        states = {d.state for d in items}
        done = sum(1 for d in items if d.state == "done")
        if "dead" in states:
            word = "dead-lettered"
        elif states == {"done"}:
            word = "sent"
        elif "sending" in states:
            word = "sending"
        elif any(d.state == "pending" and d.attempts > 0 for d in items):
            word = "retrying"
        else:
            word = "queued"
        out.append(DestinationSummary(dest, word, done, len(items)))
    return out


@dataclass
class Row:
    """One worklist row."""

    job_id: int
    sop_instance_uid: str
    status: str
    received_at: float
    updated_at: float
    attempts: int
    last_error: str | None
    header: Header
    path: str = ""
    band: str | None = None
    melanoma_probability: float | None = None
    destinations: list[DestinationSummary] = field(default_factory=list)

    @property
    def status_label(self) -> str:
        return STATUSES[self.status]


@dataclass
class Page:
    rows: list[Row]
    page: int
    pages: int
    total: int
    live: bool  # a job is queued or running: the worklist refreshes itself


@dataclass
class DeadLetter:
    id: int
    kind: str  # "job" | "delivery"
    ref_id: int
    destination: str
    attempts: int
    error: str
    created_at: float


@dataclass
class ResultView:
    """Everything the result page shows for one SOP Instance UID."""

    sop_instance_uid: str
    job: dict[str, Any] | None
    status: str | None
    header: Header
    result: dict[str, Any] | None
    files: list[str]
    source_available: bool
    deliveries: list[Delivery]
    dead_letters: list[DeadLetter]


class _Cache:
    """A small thread-safe LRU cache keyed by (path, mtime_ns, size)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._items: OrderedDict[tuple[str, int, int], Any] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple[str, int, int]) -> Any:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        return None

    def put(self, key: tuple[str, int, int], value: Any) -> None:
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.size:
                self._items.popitem(last=False)


def _file_key(path: Path) -> tuple[str, int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return (str(path), st.st_mtime_ns, st.st_size)


class ConsoleState:
    """Read access to one storage root, and the replays the result page offers.

    Parameters
    ----------
    root:
        ``storage.root``.
    delivery:
        The delivery settings (the outbox the replay uses is built as ``dermnode replay`` builds it).

    Raises
    ------
    StorageError
        When the state database cannot be opened.
    """

    def __init__(self, root: Path, delivery: DeliverySettings, state: StateDB | Path | None = None) -> None:
        self.root = root
        self.db = database_path(root) if state is None else state  # the SQLite file, or the shared state
        self.results = root / "results"
        self.queue = JobQueue(self.db)
        self.outbox = Outbox(self.db, delivery)
        self._headers = _Cache(100_000)
        self._results = _Cache(10_000)
        self._images = _Cache(8)
        self._local = threading.local()  # this module's one query (the worklist) uses its own connection

    # -- per-file readers (cached) --------------------------------------------------------------------------
    def header(self, path: str | Path) -> Header:
        p = Path(path)
        key = _file_key(p)
        if key is None:
            return Header()
        cached = self._headers.get(key)
        if cached is not None:
            return cached
        try:
            ds = pydicom.dcmread(
                p, stop_before_pixels=True, specific_tags=["PatientID", "AccessionNumber", "StudyDate"]
            )
            header = Header(
                patient_id=str(ds.get("PatientID", "") or ""),
                accession_number=str(ds.get("AccessionNumber", "") or ""),
                study_date=str(ds.get("StudyDate", "") or ""),
                available=True,
            )
        except Exception as exc:  # an unreadable spool file: shown without identity
            logger.debug("cannot read the header of job file %s: %s", p.name, exc)
            header = Header()
        self._headers.put(key, header)
        return header

    def result(self, sop_instance_uid: str) -> dict[str, Any] | None:
        """``results/<uid>/result.json``, or ``None`` when there is none (yet) or it cannot be read."""
        if not is_valid_uid(sop_instance_uid):
            return None
        path = self.results / sop_instance_uid / "result.json"
        key = _file_key(path)
        if key is None:
            return None
        cached = self._results.get(key)
        if cached is not None:
            return cached
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            logger.warning("cannot read result.json of %s: %s", sop_instance_uid, exc)
            return None
        if not isinstance(doc, dict):
            return None
        self._results.put(key, doc)
        return doc

    def result_file(self, sop_instance_uid: str, name: str) -> Path | None:
        """An output file of a result (one of :data:`RESULT_FILES`), if it exists."""
        if name not in RESULT_FILES or not is_valid_uid(sop_instance_uid):
            return None
        path = self.results / sop_instance_uid / name
        return path if path.is_file() else None

    def source_file(self, sop_instance_uid: str) -> Path | None:
        """The spooled instance of a job (``None`` when there is no job or the copy was pruned)."""
        if not is_valid_uid(sop_instance_uid):
            return None
        row = self.queue.get(sop_instance_uid)
        if row is None:
            return None
        path = Path(row["path"])
        return path if path.is_file() else None

    def source_png(self, sop_instance_uid: str, size: tuple[int, int] | None) -> bytes | None:
        """The source image as PNG (the first frame, as analysed), resized to ``size`` (the overlay's size)."""
        from PIL import Image

        from dermnode.dicom_io.reading import decode_rgb, read_dataset

        path = self.source_file(sop_instance_uid)
        key = None if path is None else _file_key(path)
        if path is None or key is None:
            return None
        key = (f"{key[0]}@{size}", key[1], key[2])
        cached = self._images.get(key)
        if cached is not None:
            return cached
        try:
            image = Image.fromarray(decode_rgb(read_dataset(path)), "RGB")
        except Exception as exc:  # the analysis reported its own decode error; the page shows the overlay only
            logger.warning("cannot decode the source of %s for display: %s", sop_instance_uid, exc)
            return None
        if size is not None and image.size != size:
            image = image.resize(size, Image.Resampling.LANCZOS)
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        data = buf.getvalue()
        self._images.put(key, data)
        return data

    # -- the worklist ----------------------------------------------------------------------------------------
    def _job_rows(self, states: tuple[str, ...] | None) -> list[StateRow]:
        sql = (
            "SELECT id, sop_instance_uid, state, outcome, attempts, last_error, received_at, updated_at, path"
            " FROM jobs"
        )
        args: tuple[str, ...] = ()
        if states:
            sql += f" WHERE state IN ({', '.join('?' for _ in states)})"
            args = states
        conn: StateConnection | None = getattr(self._local, "conn", None)
        if conn is None or conn.broken:
            conn = self._local.conn = self.queue.state_db.connect()
        return list(conn.execute(sql + " ORDER BY id DESC", args))

    def deliveries(self, job_id: int) -> list[Delivery]:
        return [
            Delivery(r["destination"], r["kind"], r["object_key"], r["state"], r["attempts"], r["last_error"])
            for r in self.outbox.for_job(job_id)
        ]

    def worklist(
        self, *, status: str = "", band: str = "", search: str = "", page: int = 1, page_size: int = 25
    ) -> Page:
        """Jobs newest first, filtered by status, band and a patient ID or accession number search."""
        states: tuple[str, ...] | None = None
        if status in ("queued", "running", "dead"):
            states = ({"queued": "pending", "running": "running", "dead": "dead"}[status],)
        elif status in ("analysed", "not_analysable") or band:
            states = ("done",)
        needle = search.strip().lower()
        rows: list[Row] = []
        for r in self._job_rows(states):
            st = job_status(r["state"], r["outcome"])
            if status and st != status:
                continue
            header = self.header(r["path"]) if needle else Header()
            if needle and needle not in header.patient_id.lower() and needle not in header.accession_number.lower():
                continue
            row = Row(
                job_id=r["id"],
                sop_instance_uid=r["sop_instance_uid"],
                status=st,
                received_at=r["received_at"],
                updated_at=r["updated_at"],
                attempts=r["attempts"],
                last_error=r["last_error"],
                header=header,
                path=r["path"],
            )
            if band:
                self._fill_result(row)
                if row.band != band:
                    continue
            rows.append(row)
        total = len(rows)
        pages = max(1, -(-total // page_size))
        page = min(max(page, 1), pages)
        shown = rows[(page - 1) * page_size : page * page_size]
        for row in shown:
            if not row.header.available:
                row.header = self.header(row.path)
            if row.band is None:
                self._fill_result(row)
            row.destinations = summarise(self.deliveries(row.job_id))
        counts = self.queue.counts()
        live = counts.get("pending", 0) + counts.get("running", 0) > 0
        return Page(shown, page, pages, total, live)

    def _fill_result(self, row: Row) -> None:
        if row.status not in ("analysed", "not_analysable"):
            return
        doc = self.result(row.sop_instance_uid)
        classification = (doc or {}).get("classification") or {}
        if isinstance(classification, dict):
            band = classification.get("band")
            prob = classification.get("melanoma_probability")
            row.band = band if isinstance(band, str) else None
            row.melanoma_probability = float(prob) if isinstance(prob, int | float) else None

    # -- one result ------------------------------------------------------------------------------------------
    def dead_letters_of(self, sop_instance_uid: str, job_id: int | None) -> list[DeadLetter]:
        """Open (not yet replayed) dead letters of a job and of its deliveries (``dermnode status --dead-letters``)."""
        out = []
        for r in self.queue.dead_letters():
            if r["replayed_at"] is not None:
                continue
            mine = (r["kind"] == "job" and r["ref_id"] == job_id) or (
                r["kind"] == "delivery" and r["sop_instance_uid"] == sop_instance_uid
            )
            if mine:
                out.append(
                    DeadLetter(r["id"], r["kind"], r["ref_id"], r["destination"], r["attempts"], r["error"],
                               r["created_at"])
                )
        return out

    def view(self, sop_instance_uid: str) -> ResultView | None:
        """The result page's content; ``None`` when neither a job nor a result exists for the UID."""
        if not is_valid_uid(sop_instance_uid):
            return None
        row = self.queue.get(sop_instance_uid)
        result = self.result(sop_instance_uid)
        if row is None and result is None:
            return None
        job = None if row is None else {k: row[k] for k in row.keys()}  # noqa: SIM118 - sqlite3.Row
        header = Header() if row is None else self.header(row["path"])
        files = [name for name in RESULT_FILES if self.result_file(sop_instance_uid, name) is not None]
        return ResultView(
            sop_instance_uid=sop_instance_uid,
            job=job,
            status=None if row is None else job_status(row["state"], row["outcome"]),
            header=header,
            result=result,
            files=files,
            source_available=row is not None and Path(row["path"]).is_file(),
            deliveries=[] if row is None else self.deliveries(row["id"]),
            dead_letters=self.dead_letters_of(sop_instance_uid, None if row is None else row["id"]),
        )

    def replay(self, sop_instance_uid: str, dead_letter_id: int) -> int:
        """Re-queue one open dead letter of this result, as ``dermnode replay JOB`` / ``--delivery ID`` does.

        Returns the number of items re-queued (0 when the dead letter is not this result's, or already replayed).
        """
        row = self.queue.get(sop_instance_uid)
        letters = self.dead_letters_of(sop_instance_uid, None if row is None else row["id"])
        letter = next((d for d in letters if d.id == dead_letter_id), None)
        if letter is None:
            return 0
        if letter.kind == "job":
            return self.queue.replay(letter.ref_id)
        return self.outbox.replay(letter.ref_id)

    def counts(self) -> dict[str, dict[str, int]]:
        """``dermnode status``'s numbers."""
        return {"jobs": self.queue.counts(), "deliveries": self.outbox.counts()}
