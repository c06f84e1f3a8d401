"""Scale-out throughput (issue 15): images analysed per minute with 1 and 2 ``--role analyze`` processes.

For each number of analyze processes M, a fresh farm (``tests/scale_out/scale_out_farm.py``): a throwaway
PostgreSQL cluster, Orthanc, the loopback FHIR server, 2 ``dermnode serve --role receive`` + M ``--role analyze``
+ 1 ``--role deliver`` on one shared storage root. After a 2-image warm-up (models loaded, first-call costs paid),
``A`` DCMTK ``storescu`` associations x ``I`` JPEG images each are sent at once, split over the two receivers; the
run ends when every job is done and every result delivered (Orthanc + FHIR). Then the exactly-once checks of the
tests (``check_once``) run on the same images.

Reported per M: analysed/min steady = (N - 1) / (last job done - first job done); analysed/min from the first
C-STORE = N / (last job done - first storescu start); delivered/min likewise to the last delivery; CPU seconds
per image of each process kind (utime+stime from /proc, PostgreSQL's exited backends through the postmaster's
cutime/cstime) during the timed part; the state database's size and the shared storage used per image. The
numbers feed the capacity estimate in ``docs/scale-out.md``.

Usage::

    python bench/scale_out.py                        # 6 associations x 30 images, M = 1 and 2
    python bench/scale_out.py --associations 2 --images 5 --analyzers 1   # quick check
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import REPO, busy_processes, machine_info, source_images, write_dicoms

sys.path.insert(0, str(REPO / "tests" / "scale_out"))

from scale_out_farm import Farm, check_once, running_farm, storescu

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int, *, children: bool = False) -> float:
    """utime+stime (and the reaped children's, with ``children``) of ``pid`` in seconds; 0 when gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    ticks = int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15 of stat)
    if children:
        ticks += int(fields[13]) + int(fields[14])  # cutime, cstime
    return ticks / TICKS


def children_of(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            if ppid == pid:
                out.append(int(entry.name))
    return out


def cpu_snapshot(farm: Farm) -> dict[str, float]:
    snap: dict[str, float] = {}
    for name, proc in farm.processes.items():
        kind = farm.roles[name]
        if proc.proc is not None and proc.proc.poll() is None:
            snap[kind] = snap.get(kind, 0.0) + cpu_s(proc.pid)
    pg = farm.cluster.pid()
    if pg is not None:
        snap["postgresql"] = cpu_s(pg, children=True) + sum(cpu_s(c) for c in children_of(pg))
    snap["orthanc"] = cpu_s(farm.orthanc.proc.pid)
    return snap


def du_bytes(folder: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(folder):
        for f in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, f)).st_blocks * 512
    return total


def run_case(analyzers: int, associations: int, images: int, work: Path, sources: list[Any]) -> dict[str, Any]:
    n = associations * images
    with running_farm(work / f"m{analyzers}", receivers=2, analyzers=analyzers, deliverers=1, lease_s=30.0,
                      ready_timeout=300.0) as farm:
        receivers = farm.by_role("receive")
        warm = write_dicoms(work / f"m{analyzers}-warm", 2, jpeg=True, images=sources, tag="warm")
        subprocess.run(storescu(receivers[0].port, [f.path for f in warm]), check=True, capture_output=True,
                       timeout=120)
        farm.wait_processed([f.sop_instance_uid for f in warm], timeout=300)
        files = write_dicoms(work / f"m{analyzers}-load", n, jpeg=True, images=sources, tag="load")
        uids = [f.sop_instance_uid for f in files]
        parts = [files[i::associations] for i in range(associations)]
        storage_before = du_bytes(farm.storage)
        db_before = farm.sql("SELECT pg_database_size('dermnode') AS b")[0]["b"]
        cpu0 = cpu_snapshot(farm)
        t0 = time.time()
        procs = [subprocess.Popen(storescu(receivers[i % len(receivers)].port, [f.path for f in part]),
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                 for i, part in enumerate(parts)]
        rcs = [p.wait(600) for p in procs]
        sent_s = time.time() - t0
        farm.wait_processed(uids, timeout=3600)
        cpu1 = cpu_snapshot(farm)
        jobs = farm.jobs(uids)
        dels = farm.deliveries(uids)
        report = check_once(farm, uids)
        farm.sql("CHECKPOINT")
        db_after = farm.sql("SELECT pg_database_size('dermnode') AS b")[0]["b"]
        tables = {r["t"]: r["b"] for r in farm.sql(
            "SELECT relname AS t, pg_total_relation_size(oid) AS b FROM pg_class"
            " WHERE relname IN ('jobs', 'deliveries', 'dead_letters')")}
        rows = farm.sql("SELECT (SELECT count(*) FROM jobs) AS j, (SELECT count(*) FROM deliveries) AS d")[0]
        storage_after = du_bytes(farm.storage)
        done = sorted(float(j["updated_at"]) for j in jobs)
        delivered = max(float(d["delivered_at"]) for d in dels)
        per_worker = {name: len(re.findall(r"analysed [0-9.]+:", farm.processes[name].log()))
                      for name in farm.processes if farm.roles[name] == "analyze"}
    steady = (n - 1) / (done[-1] - done[0]) * 60 if done[-1] > done[0] else float("nan")
    return {
        "analyzers": analyzers,
        "images": n,
        "associations": associations,
        "storescu_returncodes": rcs,
        "all_sent_s": round(sent_s, 2),
        "analysed_per_min_steady": round(steady, 1),
        "analysed_per_min_from_first_send": round(n / (done[-1] - t0) * 60, 1),
        "delivered_per_min_from_first_send": round(n / (delivered - t0) * 60, 1),
        "first_send_to_last_delivery_s": round(delivered - t0, 1),
        "cpu_s_per_image": {k: round((cpu1.get(k, 0.0) - cpu0.get(k, 0.0)) / n, 4) for k in sorted(cpu1)},
        "analysed_lines_per_process": per_worker,
        "db_bytes_per_image": round((db_after - db_before) / n),
        "db_total_bytes": db_after,
        "table_bytes": tables,
        "rows": rows,
        "storage_bytes_per_image": round((storage_after - storage_before) / n),
        "exactly_once": {"jobs": report.jobs, "deliveries": report.deliveries,
                         "orthanc_instances": report.orthanc_instances, "fhir_posts": report.fhir_posts,
                         "outcomes": report.outcomes},
    }


def markdown(machine: dict[str, Any], busy: list[str], inputs: str, cases: list[dict[str, Any]]) -> str:
    lines = [
        "# Scale-out throughput (bench/scale_out.py)",
        "",
        f"* Date (UTC): {machine['date']}; git commit `{machine['git_commit']}`",
        f"* Machine: {machine['nproc']} CPU(s), {machine['cpu_model']}, {machine['ram_gib']} GiB RAM; load average "
        f"at start {', '.join(f'{x:.2f}' for x in machine['loadavg_at_start'])}",
        "* **Shared machine**: the 2 cores were shared with other work during the run (a background model training "
        "at nice 10 and other engineers' tests); absolute numbers are lower than on an idle host and vary by "
        "+-15 % or more between runs. Processes seen at start: " + ("; ".join(busy) if busy else "none"),
        f"* Software: {', '.join(f'{k} {v}' for k, v in machine['versions'].items())}",
        f"* Inputs: JPEG Baseline, {inputs}",
        "* Farm: PostgreSQL 15 (throwaway cluster, fsync off), 2 receive + M analyze (1 worker, 1 torch thread "
        "each) + 1 deliver process, one shared storage root on the local disk, Orthanc + loopback FHIR server",
        "",
        "| analyze processes | images | analysed/min (steady) | analysed/min (from first C-STORE) | "
        "delivered/min (from first C-STORE) | first C-STORE → last delivery | exactly once |",
        "|---:|---:|---:|---:|---:|---:|---|",
    ]
    for c in cases:
        once = c["exactly_once"]
        lines.append(
            f"| {c['analyzers']} | {c['images']} | {c['analysed_per_min_steady']} | "
            f"{c['analysed_per_min_from_first_send']} | {c['delivered_per_min_from_first_send']} | "
            f"{c['first_send_to_last_delivery_s']} s | yes ({once['jobs']} jobs, {once['deliveries']} deliveries, "
            f"{once['orthanc_instances']} Orthanc instances, {once['fhir_posts']} FHIR POSTs) |"
        )
    kinds = sorted({k for c in cases for k in c["cpu_s_per_image"]})
    lines += ["", "CPU seconds per image (utime+stime during the timed part, all processes of a kind):", "",
              "| analyze processes | " + " | ".join(kinds) + " | total |",
              "|---:|" + "---:|" * (len(kinds) + 1)]
    for c in cases:
        cpu = c["cpu_s_per_image"]
        lines.append(f"| {c['analyzers']} | " + " | ".join(f"{cpu.get(k, 0.0):.3f}" for k in kinds)
                     + f" | {sum(cpu.values()):.3f} |")
    lines += ["", "State and storage per image:", "",
              "| analyze processes | PostgreSQL growth per image | jobs+deliveries tables (total) | rows "
              "(jobs, deliveries) | shared storage per image |", "|---:|---:|---:|---|---:|"]
    for c in cases:
        t = c["table_bytes"]
        lines.append(f"| {c['analyzers']} | {c['db_bytes_per_image'] / 1024:.1f} kB | "
                     f"{(t.get('jobs', 0) + t.get('deliveries', 0)) / 1024:.0f} kB | {c['rows']['j']}, "
                     f"{c['rows']['d']} | {c['storage_bytes_per_image'] / 1024:.0f} kB |")
    lines += ["", "Jobs per analyze process (`analysed` log lines, warm-up included): "
              + "; ".join(f"M={c['analyzers']}: {c['analysed_lines_per_process']}" for c in cases), ""]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--associations", type=int, default=6)
    ap.add_argument("--images", type=int, default=30, help="images per association")
    ap.add_argument("--analyzers", default="1,2", help="comma-separated numbers of analyze processes")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "scale_out.md")
    args = ap.parse_args()
    machine = machine_info()
    busy = busy_processes()
    sources, inputs = source_images()
    cases = []
    with tempfile.TemporaryDirectory(prefix="dermnode-scale-out-") as tmp:
        for m in (int(x) for x in args.analyzers.split(",")):
            case = run_case(m, args.associations, args.images, Path(tmp), sources)
            print(json.dumps(case), flush=True)
            cases.append(case)
    text = markdown(machine, busy, inputs, cases)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    raw = args.out.with_name(f"{args.out.stem}-{stamp}.json")
    raw.write_text(json.dumps({"machine": machine, "busy": busy, "inputs": inputs, "cases": cases}, indent=2))
    print(text)
    print(f"written {args.out} and {raw}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
