"""Where the outputs stage goes: overlay, SEG, presentation state, SR, FHIR bundle, result.json, file writes.

Usage::

    .venv/bin/python bench/outputs_profile.py [--images 8] [--repeats 3] [--baseline REV [--rounds 3]]
                                             [--profile N] [--out bench/results/outputs_profile.md]

Builds ``--images`` realistic 768x576 Dermoscopic Photography Images (the real photographs of
:func:`common.source_images`, JPEG baseline as a modality sends them, 0.02 mm/pixel, a Patient ID so a FHIR
bundle is written), analyses each once with the shipped models and then times
:func:`dermnode.pipeline.write_outputs` on them ``--repeats`` times each with the default settings (fsync on,
FHIR bundle with the overlay). Each call is split into what it spends per output by timing the builders the
pipeline module calls (exclusive times: a nested call is counted once, in the inner output):

- ``overlay``: drawing and encoding the overlay picture;
- ``seg`` / ``pr`` / ``sr``: building the SEG, the presentation state (and key image when configured), the SR,
  and encoding each to DICOM bytes;
- ``fhir``: building, validating and serialising the bundle;
- ``files``: writing every file, with its fsyncs;
- ``other``: everything else (``result.json``, bookkeeping, waiting for the overlay PNG's thread);
- ``overlay (thread)``: the overlay PNG encoded in a pool thread beside the builders (CPU, not wall time);
- ``total``: one call; ``process CPU``: the CPU time of the whole process (every thread) during one call.

Every row has a wall and a CPU column (``time.thread_time`` of the thread that did the work).

With ``--baseline REV`` the same measurement runs on ``git archive REV src`` (the code before the change) and on
this checkout's ``src``, each in its own subprocess, alternating for ``--rounds`` rounds, so that *before* and
*after* come from one run on the same inputs and the drifting load of a shared machine weighs on both alike. A
torchvision resnet18 forward (224 px, 2 threads, and 1 thread) is timed in every run, before and after the
outputs, as the yardstick: every total is also given as a multiple of it. ``--profile N`` (without
``--baseline``) prints the N costliest functions (cProfile, cumulative) of the current code. Writes a markdown
table to ``--out`` (and, with ``--json FILE``, the raw numbers).
Timings are medians; the machine is shared, so compare within one run.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import dataclasses
import io
import json
import os
import pstats
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

#: Output categories, in table order.
CATEGORIES = ("overlay", "seg", "pr", "sr", "fhir", "files", "other")
#: Work done in another thread while the calling thread goes on (not part of the wall time).
THREAD_CATEGORIES = ("overlay (thread)",)
#: Module-level names of ``dermnode.pipeline`` timed as one output each (absent names are skipped, so the same
#: instrumentation measures the code before and after the change).
_BUILDERS = {
    "render_overlay": "overlay",
    "encode_png": "overlay",
    "encode_overlay": "overlay",
    "build_segmentation": "seg",
    "build_outline_objects": "pr",
    "build_report": "sr",
    "build_bundle": "fhir",
    "encode_bundle": "fhir",
    "encode_jpeg": "overlay",
    "atomic_write": "files",
}
#: Methods of the pipeline's file writer (the code after the change), timed as ``files``.
_WRITER_METHODS = ("stage", "commit")
#: DICOM encoding helpers (first argument: the dataset); the output is told by its Modality.
_ENCODERS = ("_save", "_dicom_bytes")
_MODALITY = {"SEG": "seg", "SR": "sr", "PR": "pr"}


class Timer:
    """Exclusive wall and CPU time per category: time inside a nested timed call counts for the inner one only.

    CPU time is the calling thread's (``time.thread_time``): on a machine shared with other work it moves much
    less than wall time, so it is the steadier before/after comparison.
    """

    def __init__(self) -> None:
        self.acc: dict[str, float] = defaultdict(float)
        self.cpu: dict[str, float] = defaultdict(float)
        self._stack: list[list[float]] = []
        self._lock = threading.Lock()

    def clear(self) -> None:
        self.acc.clear()
        self.cpu.clear()

    @contextlib.contextmanager
    def section(self, category: str) -> Iterator[None]:
        frame = [0.0, 0.0]  # wall and CPU time of nested sections
        self._stack.append(frame)
        t0, c0 = time.perf_counter(), time.thread_time()
        try:
            yield
        finally:
            elapsed, cpu = time.perf_counter() - t0, time.thread_time() - c0
            self._stack.pop()
            self.acc[category] += elapsed - frame[0]
            self.cpu[category] += cpu - frame[1]
            if self._stack:
                self._stack[-1][0] += elapsed
                self._stack[-1][1] += cpu

    def wrap(self, category: str | Callable[..., str], fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            name = category(*args, **kwargs) if callable(category) else category
            if threading.current_thread() is not threading.main_thread():
                # work the pipeline runs beside its own thread (the overlay PNG): not part of the call's wall time
                t0, c0 = time.perf_counter(), time.thread_time()
                try:
                    return fn(*args, **kwargs)
                finally:
                    with self._lock:
                        self.acc[f"{name} (thread)"] += time.perf_counter() - t0
                        self.cpu[f"{name} (thread)"] += time.thread_time() - c0
            with self.section(name):
                return fn(*args, **kwargs)

        return wrapper


def _instrument(timer: Timer) -> None:
    import dermnode.pipeline as pl

    for name, category in _BUILDERS.items():
        if hasattr(pl, name):
            setattr(pl, name, timer.wrap(category, getattr(pl, name)))
    for name in _ENCODERS:
        if hasattr(pl, name):
            setattr(pl, name, timer.wrap(lambda ds, *a, **k: _MODALITY.get(str(ds.get("Modality")), "pr"),
                                         getattr(pl, name)))
    writer = getattr(pl, "_DurableFolder", None)
    if writer is not None:
        for name in _WRITER_METHODS:
            setattr(writer, name, timer.wrap("files", getattr(writer, name)))
    # the bundle and result.json serialised inline with json.dumps (the code before the change)
    real_json = pl.json

    class _Json:
        loads = staticmethod(real_json.loads)

        @staticmethod
        def dumps(obj: Any, **kwargs: Any) -> str:
            is_bundle = isinstance(obj, dict) and obj.get("resourceType") == "Bundle"
            with timer.section("fhir" if is_bundle else "other"):
                return real_json.dumps(obj, **kwargs)

    pl.json = _Json  # type: ignore[assignment]


def _resnet18_ms(repeats: int = 30, threads: int = 2) -> float:
    import torch
    import torchvision

    torch.set_num_threads(threads)
    model = torchvision.models.resnet18(weights=None).eval()
    x = torch.randn(1, 3, 224, 224)
    times = []
    with torch.inference_mode():
        for i in range(repeats + 5):
            t = time.perf_counter()
            model(x)
            if i >= 5:
                times.append((time.perf_counter() - t) * 1000.0)
    return statistics.median(times)


def _jobs(n_images: int) -> tuple[list[tuple[Any, Any]], Any, str]:
    """``n_images`` (dataset, analysis result) pairs of realistic 768x576 images and the settings to write them."""
    import pydicom
    from common import source_images

    from dermnode.dicom_io.reading import to_source_image
    from dermnode.dicom_io.wrap import WrapOptions, wrap_rgb
    from dermnode.inference.analyzer import Analyzer
    from dermnode.settings import Settings

    images, description = source_images(n_images)
    s = Settings()
    settings = dataclasses.replace(
        s,
        fhir=dataclasses.replace(s.fhir, base_url="http://127.0.0.1:9/fhir",
                                 patient_identifier_system="http://hospital.example/mrn"),
    )
    analyzer = Analyzer(settings.analysis)
    jobs = []
    for i, rgb in enumerate(images[:n_images]):
        ds = wrap_rgb(rgb, WrapOptions(patient_id=f"BENCH{i:05d}", patient_name="Bench^Patient",
                                       pixel_spacing_mm=0.02, jpeg=True))
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)  # as received: read back from its file bytes
        ds = pydicom.dcmread(io.BytesIO(buf.getvalue()))
        result = analyzer.analyze(to_source_image(ds, settings.analysis.calibrations))
        jobs.append((ds, result))
    statuses = sorted({r.status.value for _, r in jobs})
    return jobs, settings, f"{description}; statuses {', '.join(statuses)}"


def measure(n_images: int, repeats: int, profile_top: int = 0) -> dict[str, Any]:
    """Per-output and total medians (ms) of ``write_outputs`` on ``n_images`` images, ``repeats`` times each."""
    import dermnode.pipeline as pl

    jobs, settings, description = _jobs(n_images)
    load = os.getloadavg()
    timer = Timer()
    _instrument(timer)
    r18_before = _resnet18_ms()
    per_call: dict[str, list[float]] = defaultdict(list)
    cpu_call: dict[str, list[float]] = defaultdict(list)
    sizes: dict[str, list[int]] = defaultdict(list)
    with tempfile.TemporaryDirectory(prefix="dermnode-outputs-", dir=os.environ.get("BENCH_TMP")) as tmp:
        root = Path(tmp)
        pl.write_outputs(*jobs[0], settings, root / "warm-up")  # lazy imports, FHIR models, codecs
        for rep in range(repeats):
            for j, (ds, result) in enumerate(jobs):
                timer.clear()
                t0, c0, m0 = time.perf_counter(), time.process_time(), time.thread_time()
                files = pl.write_outputs(ds, result, settings, root / f"{rep}-{j}")
                total = (time.perf_counter() - t0) * 1000.0
                total_cpu = (time.thread_time() - m0) * 1000.0
                per_call["total"].append(total)
                cpu_call["total"].append(total_cpu)
                per_call["process CPU"].append((time.process_time() - c0) * 1000.0)  # every thread of the process
                measured = measured_cpu = 0.0
                for cat in CATEGORIES[:-1]:
                    ms, cpu = timer.acc.get(cat, 0.0) * 1000.0, timer.cpu.get(cat, 0.0) * 1000.0
                    per_call[cat].append(ms)
                    cpu_call[cat].append(cpu)
                    measured += ms
                    measured_cpu += cpu
                per_call["other"].append(max(0.0, total - measured))  # result.json, bookkeeping
                cpu_call["other"].append(max(0.0, total_cpu - measured_cpu))
                for cat in THREAD_CATEGORIES:
                    per_call[cat].append(timer.acc.get(cat, 0.0) * 1000.0)
                    cpu_call[cat].append(timer.cpu.get(cat, 0.0) * 1000.0)
                if rep == 0:
                    for p in sorted(files.directory.iterdir()):
                        sizes[p.name].append(p.stat().st_size)
        profile_text = ""
        if profile_top:
            prof = cProfile.Profile()
            prof.enable()
            for j, (ds, result) in enumerate(jobs):
                pl.write_outputs(ds, result, settings, root / f"profile-{j}")
            prof.disable()
            out = io.StringIO()
            pstats.Stats(prof, stream=out).sort_stats("cumulative").print_stats(profile_top)
            profile_text = out.getvalue()
    r18_after = _resnet18_ms()
    r18_one = _resnet18_ms(threads=1)  # steadier than 2 threads when the cores are shared
    return _summary({
        "images": description,
        "load_average": [[round(x, 2) for x in load]],
        "wall": dict(per_call),
        "cpu": dict(cpu_call),
        "sizes": dict(sizes),
        "resnet18": [r18_before, r18_after],
        "resnet18_1_thread": [r18_one],
        "profile": profile_text,
    })


def _summary(raw: dict[str, Any]) -> dict[str, Any]:
    """Medians of the raw per-call numbers of one or more :func:`measure` runs (merged by :func:`_merge`)."""
    return {
        **raw,
        "calls": len(raw["wall"]["total"]),
        "median_ms": {k: round(statistics.median(v), 2) for k, v in raw["wall"].items()},
        "median_cpu_ms": {k: round(statistics.median(v), 2) for k, v in raw["cpu"].items()},
        "file_kb": {k: round(statistics.median(v) / 1024, 1) for k, v in raw["sizes"].items()},
        "resnet18_ms": round(statistics.median(raw["resnet18"]), 2),
        "resnet18_1_thread_ms": round(statistics.median(raw["resnet18_1_thread"]), 2),
    }


def _merge(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One summary of several runs of the same code: their per-call numbers pooled."""
    merged: dict[str, Any] = {"images": runs[0]["images"], "load_average": [], "wall": defaultdict(list),
                              "cpu": defaultdict(list), "sizes": defaultdict(list), "resnet18": [],
                              "resnet18_1_thread": [], "profile": ""}
    for run in runs:
        merged["load_average"] += run["load_average"]
        merged["resnet18"] += run["resnet18"]
        merged["resnet18_1_thread"] += run["resnet18_1_thread"]
        for key in ("wall", "cpu", "sizes"):
            for k, v in run[key].items():
                merged[key][k] += v
    return _summary(merged)


def _run_tree(src: Path, n_images: int, repeats: int) -> dict[str, Any]:
    """:func:`measure` in a subprocess with ``src`` first on ``sys.path`` (the code of that tree)."""
    env = dict(os.environ, PYTHONPATH=str(src))
    proc = subprocess.run(
        [sys.executable, __file__, "--images", str(n_images), "--repeats", str(repeats), "--json-only"],
        env=env, check=True, capture_output=True, text=True,
    )
    doc: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return doc


def _before_after(rev: str, n_images: int, repeats: int, rounds: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """Before (``git archive REV src``) and after (this checkout's ``src``), measured in alternating subprocesses.

    ``rounds`` rounds of one before run and one after run each, so that the load of a shared machine, which
    drifts over minutes, weighs on both alike; the per-call numbers of each side are pooled.
    """
    with tempfile.TemporaryDirectory(prefix="dermnode-baseline-") as tmp:
        archive = subprocess.run(["git", "-C", str(REPO), "archive", rev, "src"], check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", tmp], input=archive, check=True)
        models = Path(tmp) / "src" / "dermnode" / "models"  # a relative link to <repo>/models in the tree
        if models.is_symlink():
            models.unlink()
            models.symlink_to(REPO / "models", target_is_directory=True)
        befores, afters = [], []
        for _ in range(rounds):
            befores.append(_run_tree(Path(tmp) / "src", n_images, repeats))
            afters.append(_run_tree(REPO / "src", n_images, repeats))
    before = _merge(befores)
    before["revision"] = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", rev], check=True,
                                        capture_output=True, text=True).stdout.strip()
    return before, _merge(afters)


def _markdown(after: dict[str, Any], before: dict[str, Any] | None) -> str:
    lines = [
        "# Outputs stage: per-output cost (bench/outputs_profile.py)",
        "",
        f"Inputs: {after['images']}; `write_outputs` with the default settings (fsync on, FHIR bundle with "
        f"the overlay), {after['calls']} calls per side"
        + (f" in {len(after['load_average'])} alternating before/after subprocess runs" if before else "")
        + ", medians in ms. Exclusive times per output (see the script's docstring); `total` is the wall time "
        "of one `write_outputs` call.",
        "",
    ]
    r18a = after["resnet18_ms"]
    rows = (*CATEGORIES, "total", "process CPU", *THREAD_CATEGORIES)
    if before is None:
        lines += ["| output | wall ms | CPU ms | wall x resnet18 |", "|---|---:|---:|---:|"]
        for cat in rows:
            a, ac = after["median_ms"].get(cat, 0.0), after["median_cpu_ms"].get(cat)
            lines.append(f"| {cat} | {a:.1f} | {'' if ac is None else f'{ac:.1f}'} | {a / r18a:.2f} |")
    else:
        r18b = before["resnet18_ms"]
        lines += [f"| output | before wall ms ({before['revision']}) | after wall ms | before CPU ms | after CPU ms "
                  "| before x resnet18 | after x resnet18 |", "|---|---:|---:|---:|---:|---:|---:|"]
        for cat in rows:
            b, a = before["median_ms"].get(cat, 0.0), after["median_ms"].get(cat, 0.0)
            bc, ac = before.get("median_cpu_ms", {}).get(cat), after["median_cpu_ms"].get(cat)
            bcs, acs = ("" if v is None else f"{v:.1f}" for v in (bc, ac))
            lines.append(f"| {cat} | {b:.1f} | {a:.1f} | {bcs} | {acs} | {b / r18b:.2f} | {a / r18a:.2f} |")
    lines += ["", "Per-output medians do not add up to the total's median (each is a median on its own). "
              "`overlay (thread)`: the overlay PNG encoded in a pool thread while the DICOM objects are built "
              "(CPU time beside the call, not part of its wall time; what is left of it to wait for is in "
              "`other`). CPU ms: CPU time of the calling thread (`time.thread_time`; the pool thread's own for "
              "`overlay (thread)`); `total` CPU is the calling thread's, `process CPU` (wall column) the whole "
              "process's CPU time during one call, every thread. On a machine shared with other work CPU time "
              "moves much less than wall time.", ""]
    r18 = f"resnet18 (224 px) median, 2 threads: {r18a:.1f} ms in the after runs"
    if before is not None:
        r18 += f", {before['resnet18_ms']:.1f} ms in the before runs"
    r18 += f" (timed before and after the outputs in each run); 1 thread: {after['resnet18_1_thread_ms']:.1f} ms"
    if before is not None:
        r18 += f" / {before['resnet18_1_thread_ms']:.1f} ms"
    lines += [r18 + ". The ratios use the 2-thread median of the same runs.", ""]
    loads = "; ".join(", ".join(f"{x:.1f}" for x in la) for la in after["load_average"])
    lines += [f"Load average (1, 5, 15 min) on this {os.cpu_count()}-CPU machine at the start of each after run: "
              f"{loads}.", ""]
    lines += ["File sizes (median KB):", "", "| file | before KB | after KB |" if before else "| file | KB |",
              "|---|---:|---:|" if before else "|---|---:|"]
    names = sorted(set(after["file_kb"]) | set(before["file_kb"] if before else {}))
    for name in names:
        a_kb = after["file_kb"].get(name)
        if before is None:
            lines.append(f"| {name} | {a_kb} |")
        else:
            lines.append(f"| {name} | {before['file_kb'].get(name, '-')} | {a_kb if a_kb is not None else '-'} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--baseline", default=None, help="git revision whose src/ gives the 'before' numbers")
    ap.add_argument("--rounds", type=int, default=3, help="alternating before/after runs with --baseline")
    ap.add_argument("--profile", type=int, default=0, help="print the N costliest functions (cProfile)")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "outputs_profile.md")
    ap.add_argument("--json", type=Path, default=None, help="also write the raw numbers to this JSON file")
    ap.add_argument("--json-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    import logging

    logging.disable(logging.WARNING)
    if args.json_only:
        print(json.dumps(measure(args.images, args.repeats)))
        return 0
    if args.baseline:
        before, after = _before_after(args.baseline, args.images, args.repeats, args.rounds)
    else:
        before, after = None, measure(args.images, args.repeats, args.profile)
    if after["profile"]:
        print(after["profile"])
    text = _markdown(after, before)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    if args.json is not None:
        raw = {"before": before, "after": after}
        args.json.write_text(json.dumps(raw, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
