"""The ``dermnode`` command line: serve, status, replay, prune, wrap, send, analyze, evaluate, calibrate, train,
export-onnx."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import math
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dermnode import __version__
from dermnode.errors import DermnodeError
from dermnode.settings import Settings, load_settings

#: The promises of ``dermnode calibrate`` by default (the same values as dermnode.evaluation.bands, which the CLI
#: imports only inside the command; tests/test_cli_calibrate.py checks that they agree).
DEFAULT_MAX_MISS = 0.02
DEFAULT_MIN_SPECIFICITY = 0.95

logger = logging.getLogger(__name__)


def _settings(args: argparse.Namespace) -> Settings:
    return load_settings(args.config)


def _existing_database(settings: Settings) -> Any:
    """The state database of ``settings``; the read/maintenance commands never create an SQLite one.

    With ``state.backend = "postgresql"`` this is the shared state (any host with the same configuration).

    Raises
    ------
    StorageError
        When there is no state database under ``storage.root`` (a relative root is relative to the working
        directory: a command run elsewhere would otherwise report an empty, new database).
    """
    from dermnode.errors import StorageError
    from dermnode.workqueue.db import database_path, state_db_of

    if settings.state.backend == "postgresql":
        return state_db_of(settings)
    db = database_path(settings.storage_root)
    if not db.is_file():
        raise StorageError(
            f"no state database at {db} (storage.root = {settings.storage.root!r}, working directory "
            f"{Path.cwd()}): run this where the service runs, or with its configuration"
        )
    return db


def cmd_serve(args: argparse.Namespace) -> int:
    from dermnode.delivery import build_deliverers
    from dermnode.logging_setup import configure_logging
    from dermnode.service import Service, check_port_free

    settings = _settings(args)
    configure_logging(settings.logging)
    service = Service(settings, build_deliverers(settings), role=args.role)
    if service.receives:
        check_port_free(settings.scp)  # a taken port is reported before the models load, not after
    if service.analyzes and settings.workers.count > 0:
        from dermnode.pipeline import build_processor

        # loads and verifies the models: refuses to start without them
        service.set_processor(build_processor(settings, service.outbox, service.stage_metrics))
    elif service.analyzes:
        logger.warning("workers.count = 0: receive-only mode, received instances stay queued")
    service.install_signal_handlers()
    service.start()
    if service.receives:
        print(f"dermnode {__version__}: {settings.scp.ae_title} listening on "
              f"{settings.scp.bind}:{service.port} (role {args.role})", flush=True)
    else:
        print(f"dermnode {__version__}: role {args.role} on {service.queue.state_db.describe()}", flush=True)
    service.wait()
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from dermnode.workqueue.jobs import JobQueue
    from dermnode.workqueue.outbox import Outbox

    settings = _settings(args)
    db = _existing_database(settings)
    queue = JobQueue(db)
    outbox = Outbox(db, settings.delivery)
    doc: dict[str, object] = {"jobs": queue.counts(), "deliveries": outbox.counts()}
    if args.sop_instance_uid:
        row = queue.get(args.sop_instance_uid)
        if row is None:
            print(f"no job for SOP Instance UID {args.sop_instance_uid}", file=sys.stderr)
            return 1
        doc["job"] = {k: row[k] for k in ("id", "state", "attempts", "outcome", "last_error", "calling_aet")}
        doc["job_deliveries"] = [dict(r) for r in outbox.for_job(row["id"])]
    if args.dead_letters:
        doc["dead_letters"] = [_with_local_times(dict(r)) for r in queue.dead_letters()]
    if "job_deliveries" in doc:
        doc["job_deliveries"] = [_with_local_times(r) for r in doc["job_deliveries"]]  # type: ignore[attr-defined]
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        jobs = doc["jobs"]
        dels = doc["deliveries"]
        assert isinstance(jobs, dict) and isinstance(dels, dict)
        print("jobs:       " + "  ".join(f"{k}={v}" for k, v in jobs.items()))
        print("deliveries: " + "  ".join(f"{k}={v}" for k, v in dels.items()))
        for key in ("job", "job_deliveries", "dead_letters"):
            if key in doc:
                print(f"{key}: {json.dumps(doc[key], indent=2)}")
    return 0


#: Columns of the state database that hold seconds since the epoch.
_TIME_COLUMNS = ("created_at", "updated_at", "replayed_at", "received_at", "next_attempt_at", "pruned_at")


def _local_iso(epoch: float) -> str:
    """Seconds since the epoch as an ISO 8601 local time with its UTC offset (``2026-12-02T17:03:09+01:00``)."""
    return dt.datetime.fromtimestamp(epoch).astimezone().isoformat(timespec="seconds")


def _with_local_times(row: dict[str, Any]) -> dict[str, Any]:
    """``row`` with its epoch-second columns written as ISO 8601 local times."""
    return {
        k: _local_iso(v) if k in _TIME_COLUMNS and isinstance(v, int | float) and v > 0 else v
        for k, v in row.items()
    }


def cmd_replay(args: argparse.Namespace) -> int:
    from dermnode.workqueue.jobs import JobQueue
    from dermnode.workqueue.outbox import Outbox

    settings = _settings(args)
    db = _existing_database(settings)
    if args.delivery is None and not args.dead_letter and args.job is None:
        print("give a JOB id, --delivery ID or --dead-letter", file=sys.stderr)
        return 2
    if args.dead_letter:
        n = JobQueue(db).replay() + Outbox(db, settings.delivery).replay()
        print(f"re-queued {n} item(s)" if n else "re-queued 0 item(s): nothing is dead-lettered")
        return 0
    queue: JobQueue | Outbox
    if args.delivery is not None:
        queue, what, item_id = Outbox(db, settings.delivery), "delivery", args.delivery
    else:
        queue, what, item_id = JobQueue(db), "job", args.job
    n = queue.replay(item_id)
    if n:
        print(f"re-queued {what} {item_id}")
        return 0
    state = queue.state_of(item_id)
    if state is None:
        print(f"dermnode: {what} {item_id} does not exist", file=sys.stderr)
    else:
        print(f"dermnode: {what} {item_id} is not dead-lettered (state {state}): nothing to replay", file=sys.stderr)
    return 1


def cmd_prune(args: argparse.Namespace) -> int:
    from dermnode.errors import ConfigError
    from dermnode.retention import prune

    settings = _settings(args)
    if not args.older_than_days >= 0:
        raise ConfigError(f"--older-than-days must be 0 or more, got {args.older_than_days}")
    state = _existing_database(settings)  # the SQLite file, or the shared PostgreSQL state (any host)
    report = prune(settings.storage_root, args.older_than_days, dry_run=args.dry_run,
                   include_undelivered=args.include_undelivered, state=state)
    verb = "would remove" if report.dry_run else "removed"
    print(f"{verb} the files of {report.jobs} finished job(s): {report.files} file(s), {report.bytes / 1e6:.1f} MB")
    if report.undelivered:
        print(f"{report.undelivered} of them had outputs that were never delivered (their only copy is gone)")
    if report.results_kept or report.left_undelivered:
        print(f"kept: the results of {report.results_kept} of them (an output there was never delivered: only copy), "
              f"and {report.left_undelivered} old finished job(s) with nothing delivered; "
              "--include-undelivered removes them too")
    for error in report.errors:
        print(f"not removed: {error}", file=sys.stderr)
    return 1 if report.errors else 0


def cmd_wrap(args: argparse.Namespace) -> int:
    from dermnode.dicom_io.wrap import WrapOptions, wrap_file
    from dermnode.errors import ConfigError

    spacing = args.pixel_spacing
    if spacing is not None and not (math.isfinite(spacing) and spacing > 0):
        raise ConfigError(f"--pixel-spacing must be a positive number of mm per pixel, got {spacing}")

    opts = WrapOptions(
        patient_id=args.patient_id,
        patient_name=args.patient_name,
        pixel_spacing_mm=args.pixel_spacing,
        jpeg=args.jpeg,
    )
    ds = wrap_file(Path(args.image), Path(args.out), opts)
    print(f"{args.out}: SOP Instance UID {ds.SOPInstanceUID}")
    return 0


def cmd_send(args: argparse.Namespace) -> int:
    from dermnode.dicom_io.reading import expand_inputs
    from dermnode.dicom_io.sender import read_for_sending, send_files
    from dermnode.errors import DeliveryError
    from dermnode.settings import PacsDestination

    skipped_in: dict[Path, list[str]] = {}
    try:
        files = expand_inputs([Path(f) for f in args.files], skipped_in)
    except OSError as exc:
        print(f"dermnode: cannot list {exc.filename}: {exc.strerror}", file=sys.stderr)
        return 1
    for folder, names in skipped_in.items():
        if not any(p.parent == folder for p in files):
            print(f"dermnode: no files to send in {folder} (skipped: {', '.join(names) or 'none'})", file=sys.stderr)
    good: list[Path] = []
    bad = 0
    for path in files:
        try:
            read_for_sending(path)
        except DeliveryError as exc:
            print(f"dermnode: {exc}", file=sys.stderr)
            bad += 1
            continue
        good.append(path)
    where = f"{args.called_aet}@{args.host}:{args.port}"
    if not good:
        print(f"dermnode: nothing to send to {where}", file=sys.stderr)
        return 1
    dest = PacsDestination(name="cli", ae_title=args.called_aet, host=args.host, port=args.port)
    send_files(dest, args.calling_aet, good, timeout_s=args.timeout)
    print(f"sent {len(good)} file(s) to {where}" + (f"; {bad} file(s) not sent (see above)" if bad else ""))
    return 1 if bad else 0


def cmd_analyze(args: argparse.Namespace) -> int:
    from dermnode.dicom_io.reading import expand_inputs

    settings = _settings(args)
    skipped_in: dict[Path, list[str]] = {}
    try:
        inputs = expand_inputs([Path(f) for f in args.files], skipped_in)
    except OSError as exc:
        print(f"dermnode: cannot list {exc.filename}: {exc.strerror}", file=sys.stderr)
        return 1
    for folder, names in skipped_in.items():
        if not any(p.parent == folder for p in inputs):
            print(f"dermnode: no images in {folder} (looked at the files directly inside it; skipped: "
                  f"{', '.join(names) or 'nothing'})", file=sys.stderr)
    if not inputs:
        print("dermnode: nothing to analyse", file=sys.stderr)
        return 1

    from dermnode.pipeline import analyze_files

    results = analyze_files(settings, inputs, Path(args.out))
    for r in results:
        uid = f"{r.sop_instance_uid}: " if r.sop_instance_uid else ""
        status = "not analysable" if r.status == "not_analysable" else r.status
        print(f"{r.path}: {uid}{status}" + (f" ({r.detail})" if r.detail else ""))
    counts = {k: sum(1 for r in results if r.status == k) for k in ("analysed", "not_analysable", "failed")}
    print(f"{counts['analysed']} analysed, {counts['not_analysable']} not analysable, {counts['failed']} failed "
          f"(outputs in {args.out})")
    if counts["failed"]:
        print(f"dermnode: {counts['failed']} of {len(results)} input(s) could not be analysed", file=sys.stderr)
    return 1 if counts["failed"] or not results else 0


def _has_split_column(data: Path) -> bool | None:
    """Whether ``data/labels.csv`` has a ``split`` column; ``None`` when there is no such file."""
    import csv

    labels = data / "labels.csv"
    if not labels.is_file():
        return None
    with labels.open(newline="", encoding="utf-8") as fh:
        header = next(csv.reader(fh), [])
    return "split" in [h.strip() for h in header]


def _metric_rows(doc: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """(dotted key, value) of the numbers and short strings of a metrics document, lists and big tables left out."""
    rows: list[tuple[str, Any]] = []
    if isinstance(doc, dict):
        for k, v in doc.items():
            key = f"{prefix}.{k}" if prefix else str(k)
            if isinstance(v, dict):
                if len(v) <= 12:
                    rows += _metric_rows(v, key)
            elif isinstance(v, bool) or v is None:
                continue
            elif isinstance(v, int | float) or (isinstance(v, str) and len(v) <= 40 and prefix):
                rows.append((key, v))
    return rows


def cmd_evaluate(args: argparse.Namespace) -> int:
    data = Path(args.data)
    _labelled_folder(data)
    split = args.split
    if split is None:  # a folder without a split column is evaluated whole: say so ("all"), not "val"
        split = "all" if _has_split_column(data) is False else "val"

    from dermnode.evaluation.runner import evaluate

    settings = _settings(args)
    out = Path(args.out)
    metrics = evaluate(data, split, settings, out, task=args.task)
    rows = _metric_rows(metrics)
    shown = rows[:MAX_METRIC_ROWS]
    width = max((len(k) for k, _ in shown), default=10)
    print(f"evaluated {data} (split {split}, task {args.task})")
    for key, value in shown:
        text = f"{value:.3f}" if isinstance(value, float) else str(value)
        print(f"  {key:<{width}}  {text}")
    if len(rows) > len(shown):
        print(f"  ... {len(rows) - len(shown)} more")
    print(f"all metrics: {out / 'metrics.json'}")
    return 0


#: At most this many lines of metrics are printed by ``dermnode evaluate`` (the rest is in metrics.json).
MAX_METRIC_ROWS = 25


def _labelled_folder(data: Path) -> None:
    """Refuse a ``--data`` that does not exist or is not a folder (a sentence, not a traceback)."""
    from dermnode.errors import ConfigError

    if not data.exists():
        raise ConfigError(f"--data {data} does not exist")
    if not data.is_dir():
        raise ConfigError(f"--data {data} is not a folder")


def _interval(ci: Sequence[float]) -> str:
    return f"95 % CI {ci[0]:.4f}-{ci[1]:.4f}" if len(ci) == 2 else "no CI"


def cmd_calibrate(args: argparse.Namespace) -> int:
    from dermnode.errors import ConfigError

    data = Path(args.data)
    _labelled_folder(data)
    if not 0 < args.max_miss < 1:
        raise ConfigError(f"--max-miss must be between 0 and 1 (a fraction of melanomas), got {args.max_miss}")
    if not 0 < args.min_specificity < 1:
        raise ConfigError(f"--min-specificity must be between 0 and 1, got {args.min_specificity}")
    split = args.split
    if split is None:
        split = "all" if _has_split_column(data) is False else "val"

    from dermnode.evaluation.bands import TooFewCasesError
    from dermnode.evaluation.calibrate import calibrate

    settings = _settings(args)
    out = Path(args.out)
    try:
        doc = calibrate(data, split, settings.analysis, out, name=args.name, max_miss=args.max_miss,
                        min_specificity=args.min_specificity)
    except TooFewCasesError as exc:
        # a property of the clinic's data, not a crash: one sentence saying what would be needed
        raise ConfigError(f"cannot calibrate on {data} (split {split}): {exc}") from None
    cut = doc["cutoffs"]
    print(f"calibration {doc['name']!r} from {data} (split {split}): {doc['n_melanoma']} melanomas, "
          f"{doc['n_other']} other lesions; temperature factor {doc['temperature_factor']:.3f}")
    print(f"  benign below     {cut['benign_below']:.4f}  ({_interval(cut['benign_below_ci'])})")
    print(f"  malignant above  {cut['malignant_above']:.4f}  ({_interval(cut['malignant_above_ci'])})")
    print(f"  melanomas called benign: {doc['missed_melanomas']} of {doc['n_melanoma']} "
          f"({doc['miss_rate']:.1%}; 95 % upper bound {doc['miss_rate_upper95']:.1%}; stated at most "
          f"{doc['max_miss']:.1%}); specificity {doc['specificity']:.1%}")
    print(f"  {'band':<14}{'lesions':>9}{'melanoma rate':>15}")
    for band, facts in doc["bands"].items():
        print(f"  {band:<14}{facts['fraction_of_lesions']:>9.1%}{facts['melanoma_rate']:>15.1%}")
    print(f"written to {out}; the service uses it with analysis.calibration = \"{out.resolve()}\" in the "
          f"configuration (or DERMNODE_ANALYSIS__CALIBRATION={out.resolve()})")
    return 0


def cmd_export_onnx(args: argparse.Namespace) -> int:
    from dermnode.training.onnx_export import export_onnx

    models = Path(args.models)
    for name in args.name:
        path = export_onnx(models, name)
        print(f"{name}: wrote {path} and its onnx_sha256 in {models / (name + '.json')}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    out = Path(args.out)
    data = [Path(d) for d in args.data]
    if args.task == "pseudo-labels":
        import csv

        from dermnode.inference.analyzer import models_dir
        from dermnode.training.pseudo_labels import write_pseudo_labels

        excluded: set[str] = set()
        for folder in args.exclude or []:
            with (Path(folder) / "labels.csv").open(newline="", encoding="utf-8") as fh:
                excluded |= {row["image_id"] for row in csv.DictReader(fh)}
        images = [p for d in data for p in sorted((d / "images").iterdir()) if not p.name.startswith(".")]
        teacher = Path(args.init_from) if args.init_from else models_dir(_settings(args).analysis)
        summary = write_pseudo_labels(images, teacher, out, exclude_ids=excluded)
        print(f"kept {summary.kept} of {summary.considered} images in {out} (rejected: {summary.rejected})")
        return 0
    # passed only when given, so that each training function keeps its own default
    optional: dict[str, Any] = {k: v for k, v in (("lr", args.lr), ("version", args.model_version)) if v is not None}
    if args.task == "segmentation":
        from dermnode.training.segmentation import train_segmentation

        if args.round_field_p is not None or args.fill_frames:
            print("error: --round-field-p and --fill-frames apply to classification only", file=sys.stderr)
            return 2

        path = train_segmentation(
            data[0], args.arch or "lite_unet", out, epochs=args.epochs, image_size=args.image_size or 256,
            batch_size=args.batch_size, seed=args.seed, resume=args.resume, threads=args.threads,
            extra_train_dirs=data[1:], init_from=Path(args.init_from) if args.init_from else None,
            time_budget_s=args.time_budget, frame=tuple(args.frame) if args.frame else None,
            pretrained=not args.no_pretrained, **optional,
        )
    else:
        from dermnode.training.classification import train_classification

        if not args.arch:
            print(f"error: --arch is required for classification ({', '.join(CLASSIFIER_ARCHS)})", file=sys.stderr)
            return 2
        given = [flag for flag, v in (("--frame", args.frame), ("--time-budget", args.time_budget)) if v is not None]
        if given:
            print(f"error: {' and '.join(given)} apply to segmentation only", file=sys.stderr)
            return 2
        if not 0.0 <= (args.round_field_p or 0.0) <= 1.0:
            print(f"error: --round-field-p must be between 0 and 1, got {args.round_field_p}", file=sys.stderr)
            return 2
        path = train_classification(
            data, args.arch, out, epochs=args.epochs, image_size=args.image_size or 160,
            batch_size=args.batch_size, seed=args.seed, resume=args.resume, threads=args.threads,
            pretrained=not args.no_pretrained, tta=args.tta, round_field_p=args.round_field_p or 0.0,
            fill_frames=args.fill_frames, **optional,
        )
    print(f"exported {path}")
    return 0


#: Architectures ``dermnode train --arch`` accepts (tests/test_cli_manners.py checks them against the registries).
CLASSIFIER_ARCHS = ("dermnet-xs", "dermnet-s", "dermnet-m", "tf_efficientnet_lite0", "tf_efficientnet_lite2")
SEGMENTATION_ARCHS = ("lite_unet", "smp_unet")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows every option's default (``(default: 30.0)``), except flags and options without one."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default in (None, False, argparse.SUPPRESS) or not action.option_strings:
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dermnode", description="DICOM dermoscopy analysis node "
                                "(decision support only, not a diagnosis).", formatter_class=_HelpFormatter)
    p.add_argument("--version", action="version", version=f"dermnode {__version__}",
                   help="print the version and exit")
    config_help = "TOML configuration file (default: $DERMNODE_CONFIG, else built-in defaults)"
    p.add_argument("--config", help=config_help)
    # --config is also accepted after the command (`dermnode serve --config FILE`); SUPPRESS keeps the value
    # given before the command when it is not repeated after it
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", default=argparse.SUPPRESS, help=config_help)
    sub = p.add_subparsers(dest="command", required=True)

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, parents=[common], help=help_text, description=help_text,
                              formatter_class=_HelpFormatter)

    s = command("serve", "run the Store SCP, workers and delivery")
    s.add_argument("--role", choices=("all", "receive", "analyze", "deliver"), default="all",
                   help="what this process runs: receive (Store SCP, spool, web console), analyze (job workers), "
                        "deliver (the outbox), or all (default); other than all needs state.backend = postgresql")
    s.set_defaults(func=cmd_serve)

    s = command("status", "queue and delivery counts from the state database")
    s.add_argument("--json", action="store_true", help="print one JSON document instead of text")
    s.add_argument("--sop-instance-uid", metavar="UID", help="show one job and its deliveries")
    s.add_argument("--dead-letters", action="store_true",
                   help="list dead-letter records (times in ISO 8601, local time)")
    s.set_defaults(func=cmd_status)

    s = command("replay", "re-run dead-lettered jobs or deliveries")
    s.add_argument("job", nargs="?", type=int, help="id of a dead-lettered job")
    s.add_argument("--delivery", type=int, metavar="ID", help="id of a dead-lettered delivery")
    s.add_argument("--dead-letter", action="store_true", help="all dead-lettered jobs and deliveries")
    s.set_defaults(func=cmd_replay)

    s = command("prune", "delete the spool and result files of finished, fully delivered jobs")
    s.add_argument("--older-than-days", type=float, required=True, metavar="N",
                   help="only jobs last changed more than N days ago")
    s.add_argument("--dry-run", action="store_true", help="report what would be removed, remove nothing")
    s.add_argument("--include-undelivered", action="store_true",
                   help="also remove finished jobs whose outputs were never delivered (no PACS or EHR configured, "
                        "or a delivery still pending or dead): their results folder is the only copy and goes too")
    s.set_defaults(func=cmd_prune)

    s = command("wrap", "wrap a photo as a Dermoscopic Photography Image (modality simulator)")
    s.add_argument("image", help="the photograph (JPEG, PNG, TIFF, BMP, ...)")
    s.add_argument("--out", required=True, metavar="FILE", help="the DICOM file to write")
    s.add_argument("--patient-id", default="DERM0001", help="Patient ID of the instance")
    s.add_argument("--patient-name", default="Test^Patient", help="Patient's Name (DICOM PN: Family^Given)")
    s.add_argument("--pixel-spacing", type=float, metavar="MM",
                   help="mm per pixel, positive (default: none, measurements in pixels)")
    s.add_argument("--jpeg", action="store_true", help="JPEG Baseline (YBR_FULL_422) instead of native RGB")
    s.set_defaults(func=cmd_wrap)

    s = command("send", "C-STORE DICOM files (or the files of folders) to a DICOM node")
    s.add_argument("files", nargs="+", metavar="FILE",
                   help="DICOM file, or a folder (its files, not recursive, hidden files and documents skipped)")
    s.add_argument("--host", default="127.0.0.1", help="the receiver's address")
    s.add_argument("--port", type=int, default=11112, help="the receiver's DICOM port")
    s.add_argument("--called-aet", default="DERMNODE", help="the receiver's AE title")
    s.add_argument("--calling-aet", default="DERMSEND", help="our AE title")
    s.add_argument("--timeout", type=float, default=30.0, metavar="SECONDS",
                   help="connection, association and response timeout in seconds")
    s.set_defaults(func=cmd_send)

    s = command("analyze", "analyse DICOM files, photographs or folders offline (result.json, overlay, SEG, SR, FHIR)")
    s.add_argument("files", nargs="+", metavar="FILE",
                   help="a DICOM file (recognised by content), a photograph (JPEG, PNG, TIFF, BMP, ...) or a "
                        "folder (its files, not recursive, hidden files skipped)")
    s.add_argument("--out", required=True, metavar="DIR", help="output folder (one sub-folder per instance)")
    s.set_defaults(func=cmd_analyze)

    s = command("evaluate", "measure the shipped models on a labelled folder")
    s.add_argument("--data", required=True, metavar="DIR",
                   help="labelled folder (images/, labels.csv, masks/ optional), e.g. ../shared/data/isic2017")
    s.add_argument("--split", metavar="SPLIT",
                   help="rows of labels.csv to evaluate: train, val, test or all (default: val; all for a folder "
                        "whose labels.csv has no split column)")
    s.add_argument("--out", required=True, metavar="DIR", help="output folder: metrics.json, per-task files, plots")
    s.add_argument(
        "--task",
        choices=["all", "segmentation", "classification", "pipeline"],
        default="all",
        help="pipeline: the whole production analyser on every image (what 'all' does on a folder that is not one "
        "of the training sets)",
    )
    s.set_defaults(func=cmd_evaluate)

    s = command("calibrate", "refit the band cut-offs and temperature on a clinic's own labelled images")
    s.add_argument("--data", required=True, metavar="DIR",
                   help="labelled folder in the layout 'dermnode evaluate' reads (images/, labels.csv), "
                        "ideally 100-500 cases from the clinic's own dermoscope")
    s.add_argument("--out", required=True, metavar="FILE", help="the calibration file (JSON) to write")
    s.add_argument("--split", metavar="SPLIT",
                   help="rows of labels.csv to use: train, val, test or all (default: val; all for a folder "
                        "whose labels.csv has no split column)")
    s.add_argument("--name", help="name of the calibration, e.g. the site and dermoscope (default: the folder's "
                                  "name and today's date)")
    s.add_argument("--max-miss", type=float, default=DEFAULT_MAX_MISS, metavar="FRACTION",
                   help="the benign cut-off's promise: at most this fraction of melanomas fall in the benign band")
    s.add_argument("--min-specificity", type=float, default=DEFAULT_MIN_SPECIFICITY, metavar="FRACTION",
                   help="the malignant cut-off's promise: at least this fraction of other lesions stay out of the "
                        "malignant band")
    s.set_defaults(func=cmd_calibrate)

    s = command("export-onnx", "export trained models to ONNX, which the service then runs on ONNX Runtime")
    s.add_argument("--models", required=True, metavar="DIR", help="folder of the model files (<name>.pt, .json)")
    s.add_argument("name", nargs="+", help="model names (file stems), e.g. segmentation classifier")
    s.set_defaults(func=cmd_export_onnx)

    s = command("train", "train a model with the project's own training code")
    s.add_argument("task", choices=["segmentation", "classification", "pseudo-labels"],
                   help="pseudo-labels: write the segmenter's confident masks of --data images to --out")
    s.add_argument("--data", required=True, action="append", metavar="DIR",
                   help="data folder (repeatable; segmentation: the first is the labelled set with its val split, "
                        "the others add training images, e.g. pseudo-labels)")
    s.add_argument("--arch", help="architecture; classification (required): " + ", ".join(CLASSIFIER_ARCHS)
                   + "; segmentation: " + ", ".join(SEGMENTATION_ARCHS) + " (default: lite_unet)")
    s.add_argument("--init-from", metavar="DIR", help="segmentation: start from this exported model folder; "
                   "pseudo-labels: the teacher model folder (default: the configured models)")
    s.add_argument("--exclude", action="append", metavar="DIR", help="pseudo-labels: skip the image ids of this "
                   "folder's labels.csv (repeatable; e.g. the labelled set, so that no validation image is "
                   "pseudo-labelled)")
    s.add_argument("--lr", type=float, help="peak learning rate (default: 3e-3)")
    s.add_argument("--time-budget", type=float, metavar="SECONDS",
                   help="segmentation: wall-clock budget in seconds for the training loop (default: none)")
    s.add_argument("--frame", type=int, nargs=2, metavar=("H", "W"),
                   help="segmentation: landscape working frame in pixels, multiples of 32, e.g. 192 256; images "
                        "keep their aspect ratio (default: the square --image-size)")
    s.add_argument("--no-pretrained", action="store_true",
                   help="start timm (classification) and smp (segmentation) backbones from random weights "
                        "instead of their ImageNet weights")
    s.add_argument("--round-field-p", type=float, metavar="P",
                   help="classification: probability of a simulated round dermoscope field per training image "
                        "(default: 0, none)")
    s.add_argument("--fill-frames", action="store_true",
                   help="classification: train and validate on images with their dermoscope frame filled, as the "
                        "analyser gives them to the network")
    s.add_argument("--tta", action=argparse.BooleanOptionalAction, default=True,
                   help="classification: calibrate with (and let inference use) the 4-flip test-time augmentation")
    s.add_argument("--version", dest="model_version", metavar="VERSION",
                   help="version written to the exported model's manifest (default: the training code's)")
    s.add_argument("--out", required=True, metavar="DIR", help="folder of the exported model")
    s.add_argument("--epochs", type=int, default=40, help="training epochs")
    s.add_argument("--image-size", type=int, metavar="PX",
                   help="input size in pixels (default: 256 segmentation, 160 classification)")
    s.add_argument("--batch-size", type=int, default=16, help="images per batch")
    s.add_argument("--seed", type=int, default=1234, help="random seed")
    s.add_argument("--threads", type=int, default=2, help="torch threads")
    s.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    s.set_defaults(func=cmd_train)
    return p


def _warning_to_debug_log(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                          file: Any = None, line: str | None = None) -> None:
    """``warnings.showwarning`` of the CLI: a library's warning (pydicom's "DICM prefix is missing ... force=True")
    goes to the DEBUG log, never raw to the terminal; dermnode says what is wrong in its own words."""
    logging.getLogger("py.warnings").debug("%s: %s (%s:%d)", category.__name__, message, filename, lineno)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not logging.getLogger().handlers:
        from dermnode.logging_setup import configure_logging
        from dermnode.settings import LoggingSettings

        configure_logging(LoggingSettings())
    warnings.showwarning = _warning_to_debug_log
    try:
        return int(args.func(args))
    except DermnodeError as exc:
        print(f"dermnode: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # the reader went away (`dermnode status | head -1`): stop quietly, as cat and grep do
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except OSError:
            pass
        return 141


if __name__ == "__main__":
    raise SystemExit(main())
