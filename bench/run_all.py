"""Run the speed benchmarks (ingest, end to end), print a Markdown report, keep the raw JSON, update the docs.

Usage::

    .venv/bin/python bench/run_all.py            # full run (~30-45 min on 2 cores): writes
                                                 # bench/results/<UTC time>.json and docs/performance.md
    .venv/bin/python bench/run_all.py --quick    # tiny sizes, a smoke test of the harness (no doc update)
    make bench                                   # the same as the first line

Options pass the sizes on (see ``bench/ingest.py`` and ``bench/end_to_end.py`` for the method). The end-to-end
part needs the shipped models (``models/segmentation.json`` and ``models/classifier.json``); without them it is
skipped with a note. ``docs/performance.md`` is regenerated from this run's numbers; the hand-written analysis
between ``<!-- notes:begin -->`` and ``<!-- notes:end -->`` is kept.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import analysis_budget
import end_to_end
import ingest
from common import REPO, busy_processes, machine_info

NOTES_BEGIN, NOTES_END = "<!-- notes:begin -->", "<!-- notes:end -->"
DEFAULT_NOTES = "_No analysis written yet._"


def machine_md(m: dict[str, Any]) -> str:
    v = m["versions"]
    return "\n".join([
        f"* Date (UTC): {m['date']}; git commit `{m['git_commit']}`",
        f"* Machine: {m['nproc']} CPU(s), {m['cpu_model']}, {m['ram_gib']} GiB RAM, Linux {m['kernel']}; "
        f"load average at start {', '.join(f'{x:.2f}' for x in m['loadavg_at_start'])}",
        f"* Software: dermnode {v['dermnode']}, Python {v['python']}, pydicom {v['pydicom']}, pynetdicom "
        f"{v['pynetdicom']}, numpy {v['numpy']}, torch {v['torch']}, SQLite {v['sqlite']}, DCMTK {v['dcmtk']} "
        f"(storescu/storescp), Orthanc {v['orthanc']}",
    ]) + "\n"


def report_md(res: dict[str, Any], json_name: str) -> str:
    parts = ["## Machine and software", "", machine_md(res["machine"])]
    busy = res.get("busy_at_start") or []
    if busy:
        parts += ["**Warning: other CPU-heavy processes were running at the start of this run**, the numbers are "
                  "disturbed:", "", *[f"    {b}" for b in busy], ""]
    parts += ["## Ingest (C-STORE receive speed)", "", ingest.markdown(res["ingest"])]
    if "end_to_end" in res:
        parts += ["## End to end (storescu → dermnode → Orthanc + FHIR)", "", end_to_end.markdown(res["end_to_end"])]
    else:
        parts += ["## End to end", "", f"Not run: {res.get('end_to_end_skipped', 'skipped')}", ""]
    budget = res.get("analysis_budget")
    if budget:
        parts += [budget["markdown"].split("### cProfile", 1)[0].rstrip(), "",
                  f"Profiles (cProfile, cumulative and own time) of this run: `{budget['file']}`.", ""]
    parts += [f"Raw numbers: `bench/results/{json_name}`.", ""]
    return "\n".join(parts)


METHOD = """## Method

Everything runs on this one machine over loopback; every server is started fresh on free ports by the benchmark
(with the test helpers of `tests/`) and stopped by PID at the end.

**Ingest** (`bench/ingest.py`). N realistic Dermoscopic Photography Image files, 768×576, built with
`dermnode.dicom_io.wrap.wrap_rgb` from real photographs of the shared data (HAM10000 sample and ISIC 2017 val,
resized; unique UIDs per file), in two encodings: native RGB (Explicit VR Little Endian) and JPEG Baseline
(YBR_FULL_422, quality 92). They are sent with DCMTK `storescu -R -xe` (native) / `storescu -R -xy` (JPEG), over
one association, and split round-robin over 4 `storescu` processes started together (4 concurrent associations).
The same files go to every receiver of a run. DCMTK ≥ 3.6.2 leaves Nagle's algorithm on unless `TCP_NODELAY=1` is
set in the environment; with it on, each image stalls on the ~40 ms delayed-ACK timer, so the main table runs every
DCMTK program (storescu, storescp, and Orthanc, which is built on DCMTK) with `TCP_NODELAY=1` (the receiver is what
is measured) and a second table keeps DCMTK's defaults. The time runs from the start of the first `storescu` to the
exit of the last, i.e. to the last C-STORE response; images/s = N / time, MB/s = file bytes / 10⁶ / time.
Receivers: `dermnode serve` in receive-only mode (`workers.count = 0`, default settings: the instance written as
received to a temp file + fsync + rename + directory fsync, then its job committed in SQLite WAL with
synchronous=FULL — concurrent associations share commits — before the response); Orthanc 1.10 (`Orthanc --no-jobs
CONFIG.json` as `tests/peers.start_orthanc` starts it, default storage and index settings: a PACS that also indexes
what it stores; this version has no option to fsync its storage area and does not); and the C++ reference
`storescp -od DIR +xa` (with `--fork` for 4 associations; storescp does not fsync). A diagnostic row runs dermnode
with `storage.fsync = false` (SQLite still syncs). Each case: a fresh receiver, a 4-file warm-up, `sync`, then the
timed send; repeated, the median is reported; every response must be a success and every instance must have
arrived (a job in the database / an instance in Orthanc's `/statistics` / a file in the storescp folder). CPU
ms/image are utime+stime of the receiver process (children included) and of the storescu processes during the
timed send.

**End to end** (`bench/end_to_end.py`). Orthanc 1.10 (PACS), the loopback FHIR server of the tests (EHR) and
`dermnode serve` (one `[[pacs]]` table to Orthanc, `fhir.base_url` to the FHIR server, `workers.count = 1`,
otherwise defaults: workers and the outbox wake on the commit that queues their work, with job poll 0.1 s and outbox
poll 0.2 s as the fallback; one delivery thread per destination, so the PACS and the FHIR server are sent to
concurrently; `analysis.torch_threads`). JPEG Baseline inputs. Latency = last `deliveries.delivered_at` of the job
(every DICOM result — SEG, SR, presentation state — accepted by Orthanc, FHIR transaction answered) −
`jobs.received_at` (committed just before the C-STORE response), both from `var/dermnode.db`. (a) sequential: one
image at a time after one warm-up image; (b) load: N concurrent associations × M images each, from `storescu`
processes and K of them (`--pynetdicom-associations`, default N // 4) from pynetdicom clients (sent 31 s
after start, once the harness's own readiness probe has expired, see the notes), peak RSS = `VmHWM` of the
dermnode process, and exactly-once checks (every acknowledged image has one job, done; each result delivered on
the first attempt; Orthanc's `/instances` holds exactly the delivered DICOM results; one FHIR POST per bundle); (c)
per-stage times from each job's `result.json` `timings_ms` (decode and outputs, which result.json lacks, from the
service's `analysed …` log line) and the delivery steps from the database timestamps of the sequential phase; (d)
throughput: T images queued with a receive-only dermnode, then dermnode restarted on the same storage with W
workers; analysed/min (steady) = (T − 1) / (last job done − first job done); from ready: T / (last job done, or
last delivery, − the moment the restarted service listens, models loaded).
"""


def write_doc(path: Path, res: dict[str, Any], json_name: str) -> None:
    notes = DEFAULT_NOTES
    if path.is_file():
        old = path.read_text()
        if NOTES_BEGIN in old and NOTES_END in old:
            notes = old.split(NOTES_BEGIN, 1)[1].split(NOTES_END, 1)[0].strip() or DEFAULT_NOTES
    text = "\n".join([
        "# Performance",
        "",
        "Speed of dermnode measured with `make bench` (`bench/run_all.py`); the tables below are generated from "
        "one run and are not edited by hand. Decision-support software: these are engineering numbers, not "
        "clinical ones.",
        "",
        METHOD,
        report_md(res, json_name),
        "## What limits speed",
        "",
        NOTES_BEGIN,
        notes,
        NOTES_END,
        "",
    ])
    path.write_text(text)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test of the harness")
    ap.add_argument("--ingest-n", type=int, default=100)
    ap.add_argument("--ingest-repeats", type=int, default=3)
    ap.add_argument("--ingest-senders", nargs="+", default=list(ingest.SENDERS), choices=list(ingest.SENDERS),
                    help="DCMTK configurations of the ingest runs (default: both; nodelay is the main table)")
    ap.add_argument("--sequential", type=int, default=20)
    ap.add_argument("--load", type=end_to_end._pair, default=(20, 50))
    ap.add_argument("--throughput-images", type=int, default=30)
    ap.add_argument("--throughput-configs", type=end_to_end._config, nargs="*", default=[(1, None), (2, None), (1, 2)])
    ap.add_argument("--models", type=Path, help="models folder (default: the shipped models/)")
    ap.add_argument("--skip-ingest", action="store_true")
    ap.add_argument("--skip-e2e", action="store_true")
    ap.add_argument("--skip-budget", action="store_true", help="skip the per-image analysis budget (target 1)")
    ap.add_argument("--budget-threads", type=int, default=1,
                    help="torch threads of the analyser and of resnet18 in the budget run (default 1)")
    ap.add_argument("--results", type=Path, default=REPO / "bench" / "results", help="folder of the raw JSON")
    ap.add_argument("--doc", type=Path, help="Markdown to (re)write (default: docs/performance.md, "
                    "not with --quick)")
    args = ap.parse_args(argv)
    if args.quick:
        args.ingest_n, args.ingest_repeats, args.sequential = 8, 1, 2
        args.load, args.throughput_images = (2, 2), 3
    doc = args.doc or (None if args.quick else REPO / "docs" / "performance.md")

    def log(s: str) -> None:
        print(s, flush=True)

    res: dict[str, Any] = {"machine": machine_info(), "busy_at_start": busy_processes()}
    if res["busy_at_start"]:
        log("warning: other CPU-heavy processes are running, numbers will be disturbed:\n  "
            + "\n  ".join(res["busy_at_start"]))
    if not args.skip_ingest:
        res["ingest"] = ingest.run(args.ingest_n, args.ingest_repeats, (1, 4), no_fsync=True,
                                   senders=args.ingest_senders, log=log)
    models = args.models or REPO / "models"
    if not args.skip_budget and args.models is None and not args.quick and end_to_end.models_present(models):
        out = args.results / "analysis_budget.md"
        before = args.results / "analysis_budget-before.json"
        log(f"per-image analysis budget ({args.budget_threads} torch thread(s)) -> {out}")
        analysis_budget.budget(20, 3, args.budget_threads, 25, out, before if before.is_file() else None,
                               label=res["machine"]["git_commit"])
        res["analysis_budget"] = {
            **json.loads(out.with_suffix(".json").read_text()),
            "markdown": out.read_text(),
            "file": str(out.relative_to(REPO)),
        }
    if args.skip_e2e:
        res["end_to_end_skipped"] = "--skip-e2e"
    elif not end_to_end.models_present(models):
        res["end_to_end_skipped"] = f"models not found in {models}"
        log(f"end to end skipped: {res['end_to_end_skipped']}")
    else:
        res["end_to_end"] = end_to_end.run(args.sequential, args.load, args.throughput_images,
                                           args.throughput_configs, models_dir=args.models, log=log)
    res["busy_at_end"] = busy_processes()
    res["loadavg_at_end"] = list(os.getloadavg())
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    name = f"{'quick-' if args.quick else ''}{stamp}.json"
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / name).write_text(json.dumps(res, indent=2))
    if "ingest" not in res:
        res["ingest"] = {"params": {"n": 0, "repeats": 0, "images": "not run"}, "cases": [], "ratios": [],
                         "files": {}}
    print(report_md(res, name))
    if doc is not None:
        write_doc(doc, res, name)
        log(f"wrote {doc} and bench/results/{name}")
    ok = all(c.get("ok") for c in res["ingest"]["cases"])
    e2e = res.get("end_to_end")
    if e2e:
        phases = [e2e.get("sequential"), e2e.get("load"), *e2e.get("throughput", [])]
        ok = ok and all(ph["exactly_once"]["ok"] for ph in phases if ph)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
