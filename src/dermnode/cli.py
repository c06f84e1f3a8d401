"""The ``dermnode`` command line: serve, status, replay, prune, wrap, send, analyze, evaluate, train."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from dermnode import __version__
from dermnode.errors import DermnodeError
from dermnode.settings import Settings, load_settings

logger = logging.getLogger(__name__)


def _settings(args: argparse.Namespace) -> Settings:
    return load_settings(args.config)


def _existing_database(settings: Settings) -> Path:
    """The state database of ``settings``; the read/maintenance commands never create one.

    Raises
    ------
    StorageError
        When there is no state database under ``storage.root`` (a relative root is relative to the working
        directory: a command run elsewhere would otherwise report an empty, new database).
    """
    from dermnode.errors import StorageError
    from dermnode.workqueue.db import database_path

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
    service = Service(settings, build_deliverers(settings))
    check_port_free(settings.scp)  # a taken port is reported before the models load, not after
    if settings.workers.count > 0:
        from dermnode.pipeline import build_processor

        # loads and verifies the models: refuses to start without them
        service.set_processor(build_processor(settings, service.outbox, service.stage_metrics))
    else:
        logger.warning("workers.count = 0: receive-only mode, received instances stay queued")
    service.install_signal_handlers()
    service.start()
    print(f"dermnode {__version__}: {settings.scp.ae_title} listening on "
          f"{settings.scp.bind}:{service.port}", flush=True)
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
        doc["dead_letters"] = [dict(r) for r in queue.dead_letters()]
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


def cmd_replay(args: argparse.Namespace) -> int:
    from dermnode.workqueue.jobs import JobQueue
    from dermnode.workqueue.outbox import Outbox

    settings = _settings(args)
    db = _existing_database(settings)
    if args.delivery is not None:
        n = Outbox(db, settings.delivery).replay(args.delivery)
    elif args.dead_letter:
        n = JobQueue(db).replay() + Outbox(db, settings.delivery).replay()
    elif args.job is not None:
        n = JobQueue(db).replay(args.job)
    else:
        print("give a JOB id, --delivery ID or --dead-letter", file=sys.stderr)
        return 2
    print(f"re-queued {n} item(s)")
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    from dermnode.errors import ConfigError
    from dermnode.retention import prune

    settings = _settings(args)
    if not args.older_than_days >= 0:
        raise ConfigError(f"--older-than-days must be 0 or more, got {args.older_than_days}")
    _existing_database(settings)
    report = prune(settings.storage_root, args.older_than_days, dry_run=args.dry_run)
    verb = "would remove" if report.dry_run else "removed"
    print(f"{verb} the files of {report.jobs} finished job(s): {report.files} file(s), {report.bytes / 1e6:.1f} MB")
    if report.results_kept:
        print(f"kept the results of {report.results_kept} of them: an output there was never delivered (only copy)")
    for error in report.errors:
        print(f"not removed: {error}", file=sys.stderr)
    return 1 if report.errors else 0


def cmd_wrap(args: argparse.Namespace) -> int:
    from dermnode.dicom_io.wrap import WrapOptions, wrap_file

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
    from dermnode.dicom_io.sender import send_files
    from dermnode.settings import PacsDestination

    dest = PacsDestination(name="cli", ae_title=args.called_aet, host=args.host, port=args.port)
    send_files(dest, args.calling_aet, [Path(f) for f in args.files], timeout_s=args.timeout)
    print(f"sent {len(args.files)} file(s) to {args.called_aet}@{args.host}:{args.port}")
    return 0


def cmd_analyze(args: argparse.Namespace) -> int:
    from dermnode.pipeline import analyze_files

    settings = _settings(args)
    results = analyze_files(settings, [Path(f) for f in args.files], Path(args.out))
    for uid, status in results:
        print(f"{uid}: {status}")
    failed = sum(1 for _, status in results if status.startswith("error:"))
    if failed:
        print(f"dermnode: {failed} of {len(results)} input(s) could not be analysed", file=sys.stderr)
    return 1 if failed or not results else 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from dermnode.evaluation.runner import evaluate

    settings = _settings(args)
    metrics = evaluate(Path(args.data), args.split, settings, Path(args.out), task=args.task)
    print(json.dumps(metrics, indent=2))
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
    if args.task == "segmentation":
        from dermnode.training.segmentation import train_segmentation

        path = train_segmentation(
            data[0], args.arch or "lite_unet", out, epochs=args.epochs, image_size=args.image_size or 256,
            batch_size=args.batch_size, seed=args.seed, resume=args.resume, threads=args.threads,
            extra_train_dirs=data[1:], init_from=Path(args.init_from) if args.init_from else None,
            time_budget_s=args.time_budget, **({"lr": args.lr} if args.lr is not None else {}),
        )
    else:
        from dermnode.training.classification import train_classification

        if not args.arch:
            print("error: --arch is required for classification", file=sys.stderr)
            return 2
        path = train_classification(
            data, args.arch, out, epochs=args.epochs, image_size=args.image_size or 160,
            batch_size=args.batch_size, seed=args.seed, resume=args.resume, threads=args.threads,
        )
    print(f"exported {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dermnode", description="DICOM dermoscopy analysis node "
                                "(decision support only, not a diagnosis).")
    p.add_argument("--version", action="version", version=f"dermnode {__version__}")
    config_help = "TOML configuration file (default: $DERMNODE_CONFIG, else built-in defaults)"
    p.add_argument("--config", help=config_help)
    # --config is also accepted after the command (`dermnode serve --config FILE`); SUPPRESS keeps the value
    # given before the command when it is not repeated after it
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", default=argparse.SUPPRESS, help=config_help)
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", parents=[common], help="run the Store SCP, workers and delivery")
    s.set_defaults(func=cmd_serve)

    s = sub.add_parser("status", parents=[common], help="queue and delivery counts from the state database")
    s.add_argument("--json", action="store_true")
    s.add_argument("--sop-instance-uid", help="show one job and its deliveries")
    s.add_argument("--dead-letters", action="store_true", help="list dead-letter records")
    s.set_defaults(func=cmd_status)

    s = sub.add_parser("replay", parents=[common], help="re-run dead-lettered jobs or deliveries")
    s.add_argument("job", nargs="?", type=int, help="job id")
    s.add_argument("--delivery", type=int, help="delivery id")
    s.add_argument("--dead-letter", action="store_true", help="all dead-lettered jobs and deliveries")
    s.set_defaults(func=cmd_replay)

    s = sub.add_parser(
        "prune", parents=[common], help="delete the spool and result files of finished, fully delivered jobs"
    )
    s.add_argument("--older-than-days", type=float, required=True, metavar="N",
                   help="only jobs last changed more than N days ago")
    s.add_argument("--dry-run", action="store_true", help="report what would be removed, remove nothing")
    s.set_defaults(func=cmd_prune)

    s = sub.add_parser(
        "wrap", parents=[common], help="wrap a photo as a Dermoscopic Photography Image (modality simulator)"
    )
    s.add_argument("image")
    s.add_argument("--out", required=True)
    s.add_argument("--patient-id", default="DERM0001")
    s.add_argument("--patient-name", default="Test^Patient")
    s.add_argument("--pixel-spacing", type=float, help="mm per pixel")
    s.add_argument("--jpeg", action="store_true", help="JPEG Baseline (YBR_FULL_422) instead of native RGB")
    s.set_defaults(func=cmd_wrap)

    s = sub.add_parser("send", parents=[common], help="C-STORE files to a DICOM node")
    s.add_argument("files", nargs="+")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=11112)
    s.add_argument("--called-aet", default="DERMNODE")
    s.add_argument("--calling-aet", default="DERMSEND")
    s.add_argument("--timeout", type=float, default=30.0)
    s.set_defaults(func=cmd_send)

    s = sub.add_parser("analyze", parents=[common], help="analyse DICOM files, photographs or folders offline "
                       "(result.json, overlay, SEG, SR, FHIR)")
    s.add_argument("files", nargs="+", metavar="FILE",
                   help="a DICOM file (recognised by content), a photograph (JPEG, PNG, TIFF, BMP, ...) or a "
                        "folder (its files, not recursive, hidden files skipped)")
    s.add_argument("--out", required=True)
    s.set_defaults(func=cmd_analyze)

    s = sub.add_parser("evaluate", parents=[common], help="measure the shipped models on a labelled folder")
    s.add_argument("--data", required=True)
    s.add_argument("--split", default="val")
    s.add_argument("--out", required=True)
    s.add_argument(
        "--task",
        choices=["all", "segmentation", "classification", "pipeline"],
        default="all",
        help="pipeline: the whole production analyser on every image (the default for a folder that is not one "
        "of the training sets)",
    )
    s.set_defaults(func=cmd_evaluate)

    s = sub.add_parser("train", parents=[common], help="train a model with the project's own training code")
    s.add_argument("task", choices=["segmentation", "classification", "pseudo-labels"],
                   help="pseudo-labels: write the segmenter's confident masks of --data images to --out")
    s.add_argument("--data", required=True, action="append",
                   help="data folder (repeatable; segmentation: the first is the labelled set with its val split, "
                        "the others add training images, e.g. pseudo-labels)")
    s.add_argument("--arch", help="architecture (required for classification; segmentation: lite_unet)")
    s.add_argument("--init-from", help="segmentation: start from this exported model folder; pseudo-labels: "
                   "the teacher model folder (default: the configured models)")
    s.add_argument("--exclude", action="append", help="pseudo-labels: skip the image ids of this folder's "
                   "labels.csv (repeatable; e.g. the labelled set, so that no validation image is pseudo-labelled)")
    s.add_argument("--lr", type=float, help="segmentation: peak learning rate (default 3e-3)")
    s.add_argument("--time-budget", type=float, help="segmentation: wall-clock budget in seconds")
    s.add_argument("--out", required=True)
    s.add_argument("--epochs", type=int, default=40)
    s.add_argument("--image-size", type=int)
    s.add_argument("--batch-size", type=int, default=16)
    s.add_argument("--seed", type=int, default=1234)
    s.add_argument("--threads", type=int, default=2)
    s.add_argument("--resume", action="store_true")
    s.set_defaults(func=cmd_train)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not logging.getLogger().handlers:
        from dermnode.logging_setup import configure_logging
        from dermnode.settings import LoggingSettings

        configure_logging(LoggingSettings())
    try:
        return int(args.func(args))
    except DermnodeError as exc:
        print(f"dermnode: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
