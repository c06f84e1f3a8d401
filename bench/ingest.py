"""Ingest speed: DCMTK ``storescu`` → ``dermnode serve`` (receive-only) vs → DCMTK ``storescp`` (C++ reference).

Usage::

    .venv/bin/python bench/ingest.py [--n 200] [--repeats 3] [--associations 1 4] [--out bench/results/x.json]

What is measured
    ``N`` realistic Dermoscopic Photography Image files (768x576, real photographs from the shared data when
    present, else synthetic; unique UIDs) in two encodings, native RGB (Explicit VR Little Endian, ~1.3 MB)
    and JPEG Baseline (YBR_FULL_422, quality 92), are sent with ``storescu -R -xe`` (native) or
    ``storescu -R -xy`` (JPEG) over 1 association, and split round-robin over K concurrent ``storescu``
    processes (K associations at once). The wall time runs from the start of the first ``storescu`` to the exit
    of the last one, i.e. until the last C-STORE response has been received; images/s = N / wall,
    MB/s = total file bytes / 10^6 / wall.

Receivers (a fresh one, on a free loopback port, for every run)
    * ``dermnode serve`` with ``workers.count = 0`` (receive-only) and otherwise default settings: each
      instance is written to a temporary file, fsync-ed, renamed, the directory fsync-ed, and its job committed
      to SQLite (WAL, synchronous=FULL) before the response (durable).
    * ``storescp -od DIR +xa`` (DCMTK; the same command as ``tests/peers.start_storescp``), with ``--fork`` when
      K > 1 (without it storescp serves one association at a time). storescp does not fsync.
    * optionally (``--no-fsync``) dermnode with ``storage.fsync = false`` as a diagnostic of what durability
      costs (SQLite still commits with synchronous=FULL).

Senders: DCMTK 3.6.2+ leaves Nagle's algorithm on unless the environment variable ``TCP_NODELAY=1`` is set; with it
on, every image over one association stalls on the delayed-ACK timer (~40 ms), which measures TCP and not the
receiver. The main table therefore runs ``storescu`` and ``storescp`` with ``TCP_NODELAY=1``; a second table keeps
DCMTK's defaults (``--senders`` picks).

Each run is preceded by a warm-up of 4 files (not timed) on the same receiver, then ``sync`` (so that the
receiver's fsyncs do not wait for the write-back of the freshly generated inputs). Every response must be a
success and every file must have arrived (dermnode: one job per instance in the state database; storescp: one
file per instance), otherwise the run is reported as failed. Server CPU seconds (utime+stime, children
included) and client (storescu) CPU seconds are recorded as well.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    REPO,
    SourceFile,
    busy_processes,
    db_rows,
    dcmtk_tool,
    environment,
    machine_info,
    send_parallel,
    source_images,
    write_dicoms,
)

# the test helpers (tests/ is put on sys.path by common)
from dermnode_proc import DermnodeProcess, dermnode_env
from peers import _stop, _wait_listening, free_port, start_orthanc

SEND_TIMEOUT_S = 600.0
WARMUP = 4
#: Target of issue 12: dermnode receives at least as fast as Orthanc.
GOAL_VS_ORTHANC = 1.0


def cpu_seconds(pid: int) -> float:
    """utime + stime + cutime + cstime of a process (``/proc/<pid>/stat``), in seconds."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        ticks = sum(int(x) for x in fields[11:15])
    except (OSError, ValueError, IndexError):
        return float("nan")
    return ticks / os.sysconf("SC_CLK_TCK")


def children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def _timed_send(port: int, aet: str, files: Sequence[SourceFile], warm: Sequence[SourceFile], *, jpeg: bool,
                associations: int, server_pid: int, env: dict[str, str]) -> dict[str, Any]:
    w = send_parallel(port, [f.path for f in warm], jpeg=jpeg, called_aet=aet, associations=1, timeout_s=120,
                      env=env)
    if w.success_responses != len(warm):
        raise RuntimeError(f"warm-up failed: {w.errors or w.returncodes}")
    os.sync()  # no dirty pages of the inputs or of earlier runs left to compete with the receiver's fsyncs
    cpu0, ccpu0 = cpu_seconds(server_pid), children_cpu()
    res = send_parallel(port, [f.path for f in files], jpeg=jpeg, called_aet=aet, associations=associations,
                        timeout_s=SEND_TIMEOUT_S, env=env)
    cpu1, ccpu1 = cpu_seconds(server_pid), children_cpu()
    total = sum(f.size for f in files)
    return {
        "wall_s": res.wall_s,
        "images_per_s": len(files) / res.wall_s,
        "mb_per_s": total / 1e6 / res.wall_s,
        "success_responses": res.success_responses,
        "other_responses": res.other_responses,
        "storescu_returncodes": res.returncodes,
        "server_cpu_s": cpu1 - cpu0,
        "client_cpu_s": ccpu1 - ccpu0,
        "errors": res.errors[:2000],
    }


def run_dermnode(work: Path, files: Sequence[SourceFile], warm: Sequence[SourceFile], *, jpeg: bool,
                 associations: int, env: dict[str, str], fsync: bool = True) -> dict[str, Any]:
    """One timed run against a fresh ``dermnode serve`` in receive-only mode."""
    root = work / "dermnode"
    port = free_port()
    extra = {"DERMNODE_WORKERS__COUNT": "0"}
    if not fsync:
        extra["DERMNODE_STORAGE__FSYNC"] = "false"
    proc = DermnodeProcess(root, port, dermnode_env(root, port, extra))
    try:
        proc.start(timeout=120)
        assert proc.proc is not None
        out = _timed_send(port, "DERMNODE", files, warm, jpeg=jpeg, associations=associations,
                          server_pid=proc.proc.pid, env=env)
        db = root / "var" / "dermnode.db"
        queued = {r["sop_instance_uid"] for r in db_rows(db, "SELECT sop_instance_uid FROM jobs")}
        out["received"] = sum(1 for f in files if f.sop_instance_uid in queued)
    finally:
        proc.stop()
        shutil.rmtree(root, ignore_errors=True)
    out["ok"] = out["received"] == len(files) and out["success_responses"] == len(files)
    return out


def run_storescp(work: Path, files: Sequence[SourceFile], warm: Sequence[SourceFile], *, jpeg: bool,
                 associations: int, env: dict[str, str]) -> dict[str, Any]:
    """One timed run against a fresh DCMTK ``storescp -od DIR +xa`` (``--fork`` for K > 1)."""
    directory = work / "storescp" / "in"
    directory.mkdir(parents=True, exist_ok=True)
    port = free_port()
    args = [dcmtk_tool("storescp"), "-od", str(directory), "-aet", "STORESCP", "+xa"]
    if associations > 1:
        args.append("--fork")
    log = directory.parent / "storescp.log"
    with log.open("wb") as fh:
        proc = subprocess.Popen([*args, str(port)], stdout=fh, stderr=subprocess.STDOUT, env={**os.environ, **env})
    try:
        _wait_listening(port, proc, 30.0, log)
        out = _timed_send(port, "STORESCP", files, warm, jpeg=jpeg, associations=associations, server_pid=proc.pid,
                          env=env)
        out["received"] = sum(1 for p in directory.iterdir() if p.is_file()) - len(warm)
    finally:
        _stop(proc)
        shutil.rmtree(directory.parent, ignore_errors=True)
    out["ok"] = out["received"] == len(files) and out["success_responses"] == len(files)
    return out


def run_orthanc(work: Path, files: Sequence[SourceFile], warm: Sequence[SourceFile], *, jpeg: bool,
                associations: int, env: dict[str, str]) -> dict[str, Any]:
    """One timed run against a fresh Orthanc (``tests/peers.start_orthanc``: ``Orthanc --no-jobs CONFIG.json``,
    default storage and SQLite index settings), started with the sender's environment (``TCP_NODELAY=1`` reaches
    the DCMTK inside Orthanc too)."""
    root = work / "orthanc"
    with environment(env):
        orthanc = start_orthanc(root)
    try:
        out = _timed_send(orthanc.dicom_port, orthanc.aet, files, warm, jpeg=jpeg, associations=associations,
                          server_pid=orthanc.proc.pid, env=env)
        out["received"] = int(orthanc.get("/statistics")["CountInstances"]) - len(warm)
    finally:
        orthanc.stop()
        shutil.rmtree(root, ignore_errors=True)
    out["ok"] = out["received"] == len(files) and out["success_responses"] == len(files)
    return out


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    ok = [r for r in runs if r["ok"]]
    if not ok:
        return {"ok": False, "runs": runs}
    ips = [r["images_per_s"] for r in ok]
    med = statistics.median(ips)
    chosen = min(ok, key=lambda r: abs(r["images_per_s"] - med))
    return {
        "ok": len(ok) == len(runs),
        "images_per_s": med,
        "mb_per_s": statistics.median(r["mb_per_s"] for r in ok),
        "images_per_s_min": min(ips),
        "images_per_s_max": max(ips),
        "server_cpu_ms_per_image": 1000 * statistics.median(r["server_cpu_s"] for r in ok) / chosen["n"],
        "client_cpu_ms_per_image": 1000 * statistics.median(r["client_cpu_s"] for r in ok) / chosen["n"],
        "runs": runs,
    }


#: DCMTK configurations of the sender (and of storescp): Nagle's algorithm off (TCP_NODELAY=1, DCMTK's documented
#: environment variable; the receiver is what is measured) and DCMTK's default (Nagle on since DCMTK 3.6.2).
SENDERS = {"nodelay": {"TCP_NODELAY": "1"}, "dcmtk_default": {}}


def run(n: int = 100, repeats: int = 3, associations: Sequence[int] = (1, 4), no_fsync: bool = False,
        encodings: Sequence[str] = ("native", "jpeg"), senders: Sequence[str] = ("nodelay", "dcmtk_default"),
        log: Any = print) -> dict[str, Any]:
    images, described = source_images(60)
    receivers = ["dermnode", "orthanc", "storescp"] + (["dermnode_nofsync"] if no_fsync else [])
    results: dict[str, Any] = {
        "params": {"n": n, "repeats": repeats, "associations": list(associations), "warmup_files": WARMUP,
                   "images": described, "encodings": list(encodings), "receivers": receivers,
                   "senders": {k: SENDERS[k] for k in senders}},
        "busy_at_start": busy_processes(),
        "files": {},
        "cases": [],
    }
    with tempfile.TemporaryDirectory(prefix="dermnode-bench-ingest-") as tmp:
        work = Path(tmp)
        for enc in encodings:
            jpeg = enc == "jpeg"
            files = write_dicoms(work / "src" / enc, n, jpeg=jpeg, images=images, tag=enc)
            sizes = [f.size for f in files]
            results["files"][enc] = {"n": n, "total_mb": sum(sizes) / 1e6, "mean_kb": sum(sizes) / n / 1e3,
                                     "transfer_syntax": "JPEG Baseline 1.2.840.10008.1.2.4.50" if jpeg
                                     else "Explicit VR Little Endian 1.2.840.10008.1.2.1"}
            for sender in senders:
                env = SENDERS[sender]
                # the Nagle-on sender is the secondary table: the three main receivers only
                recv = receivers if sender == senders[0] else ["dermnode", "orthanc", "storescp"]
                for k in associations:
                    for receiver in recv:
                        runs = []
                        for rep in range(repeats):
                            warm = write_dicoms(work / "warm" / f"{enc}-{sender}-{k}-{receiver}-{rep}", WARMUP,
                                                jpeg=jpeg, images=images, tag="w")
                            if receiver == "storescp":
                                r = run_storescp(work, files, warm, jpeg=jpeg, associations=k, env=env)
                            elif receiver == "orthanc":
                                r = run_orthanc(work, files, warm, jpeg=jpeg, associations=k, env=env)
                            else:
                                r = run_dermnode(work, files, warm, jpeg=jpeg, associations=k, env=env,
                                                 fsync=receiver == "dermnode")
                            r["n"] = n
                            runs.append(r)
                            log(f"ingest {enc:6s} {sender:13s} K={k} {receiver:16s} run {rep + 1}/{repeats}: "
                                f"{r['images_per_s']:7.1f} img/s {r['mb_per_s']:7.1f} MB/s "
                                f"received={r['received']}/{n} ok={r['ok']}")
                        results["cases"].append({"encoding": enc, "sender": sender, "associations": k,
                                                 "receiver": receiver, **median_run(runs)})
    # ratios dermnode / peer per case: the goal is against Orthanc (a PACS that indexes what it stores)
    by_key = {(c["encoding"], c["sender"], c["associations"], c["receiver"]): c for c in results["cases"]}
    ratios = []
    for sender in senders:
        for enc in encodings:
            for k in associations:
                d = by_key.get((enc, sender, k, "dermnode"))
                row: dict[str, Any] = {"sender": sender, "encoding": enc, "associations": k}
                for peer in ("orthanc", "storescp"):
                    o = by_key.get((enc, sender, k, peer))
                    if d and o and d.get("images_per_s") and o.get("images_per_s"):
                        row[f"vs_{peer}"] = d["images_per_s"] / o["images_per_s"]
                if "vs_orthanc" in row:
                    row["goal_met"] = row["vs_orthanc"] >= GOAL_VS_ORTHANC
                ratios.append(row)
    results["ratios"] = ratios
    results["busy_at_end"] = busy_processes()
    return results


SENDER_TITLES = {"nodelay": "DCMTK with `TCP_NODELAY=1` (Nagle off; main comparison)",
                 "dcmtk_default": "DCMTK defaults (Nagle on)"}


def markdown(res: dict[str, Any]) -> str:
    p = res["params"]
    lines = [
        f"N = {p['n']} files per run, median of {p['repeats']} runs (min–max of images/s in brackets); "
        f"inputs: {p['images']}.",
        "",
    ]
    senders = list(p.get("senders", {"nodelay": {}}))
    for sender in senders:
        cases = [c for c in res["cases"] if c.get("sender", "nodelay") == sender]
        if not cases:
            continue
        lines += [f"Sender and storescp: {SENDER_TITLES.get(sender, sender)}", "",
                  "| encoding | mean file | associations | receiver | images/s | MB/s | receiver CPU ms/image | "
                  "storescu CPU ms/image |",
                  "|---|---:|---:|---|---:|---:|---:|---:|"]
        for c in cases:
            f = res["files"][c["encoding"]]
            head = f"| {c['encoding']} | {f['mean_kb']:.0f} kB | {c['associations']} | {c['receiver']} | "
            if not c.get("images_per_s"):
                lines.append(head + "FAILED | | | |")
                continue
            lines.append(head + f"{c['images_per_s']:.1f} ({c['images_per_s_min']:.1f}–{c['images_per_s_max']:.1f})"
                         f" | {c['mb_per_s']:.1f} | {c['server_cpu_ms_per_image']:.1f} | "
                         f"{c['client_cpu_ms_per_image']:.1f} |")
        lines.append("")
    lines += [f"| sender | encoding | associations | dermnode / Orthanc (images/s) | goal ≥ {GOAL_VS_ORTHANC:.1f} | "
              "dermnode / storescp |",
              "|---|---|---:|---:|---|---:|"]

    def fmt(x: float | None) -> str:
        return "–" if x is None else f"{x:.2f}"

    for r in res["ratios"]:
        goal = "–" if "goal_met" not in r else ("met" if r["goal_met"] else "NOT met")
        lines.append(f"| {r.get('sender', 'nodelay')} | {r['encoding']} | {r['associations']} | "
                     f"{fmt(r.get('vs_orthanc'))} | {goal} | {fmt(r.get('vs_storescp', r.get('ratio')))} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100, help="files per run (default 100)")
    ap.add_argument("--repeats", type=int, default=3, help="runs per case; the median is reported (default 3)")
    ap.add_argument("--associations", type=int, nargs="+", default=[1, 4], help="concurrent associations")
    ap.add_argument("--encodings", nargs="+", default=["native", "jpeg"], choices=["native", "jpeg"])
    ap.add_argument("--no-fsync", action="store_true", help="also run dermnode with storage.fsync=false")
    ap.add_argument("--senders", nargs="+", default=["nodelay", "dcmtk_default"], choices=list(SENDERS),
                    help="DCMTK configurations: nodelay (TCP_NODELAY=1) and/or dcmtk_default (Nagle on)")
    ap.add_argument("--out", type=Path, help="write the raw JSON here")
    args = ap.parse_args(argv)
    res = {"machine": machine_info(), "ingest": run(args.n, args.repeats, args.associations, args.no_fsync,
                                                    args.encodings, args.senders,
                                                    log=lambda s: print(s, flush=True))}
    print(markdown(res["ingest"]))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res, indent=2))
        print(f"wrote {args.out.relative_to(REPO) if args.out.is_relative_to(REPO) else args.out}")
    return 0 if all(c["ok"] for c in res["ingest"]["cases"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
