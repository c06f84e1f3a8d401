"""Cost of one SEG/SR delivery to Orthanc, with and without TCP_NODELAY on dermnode's association socket.

Usage::

    .venv/bin/python bench/delivery_nodelay.py [--repeats 8]

Builds a SEG and an SR with ``dermnode.pipeline.analyze_files`` (shipped models) from one real photograph,
then times ``dermnode.dicom_io.sender.send_files`` (one association per object, as the outbox did until it sent a
job's objects together) to Orthanc:
as shipped, and with an ``EVT_CONN_OPEN`` handler that sets ``TCP_NODELAY`` on the socket (the proposed fix),
against Orthanc started with DCMTK's defaults (Nagle on) and with ``TCP_NODELAY=1`` in its environment.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import environment, source_images, write_dicoms
from pynetdicom import AE, evt

from dermnode.dicom_io.sender import send_files
from dermnode.pipeline import analyze_files
from dermnode.settings import PacsDestination, load_settings

# the test helpers (tests/ is put on sys.path by common)
from peers import start_orthanc


def set_nodelay(event: Any) -> None:
    sock = event.assoc.dul.socket.socket if event.assoc.dul.socket is not None else None
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def patched_associate(orig: Callable[..., Any]) -> Callable[..., Any]:
    def associate(self: AE, *args: Any, evt_handlers: list[Any] | None = None, **kwargs: Any) -> Any:
        return orig(self, *args, evt_handlers=[*(evt_handlers or []), (evt.EVT_CONN_OPEN, set_nodelay)], **kwargs)

    return associate


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=8)
    args = ap.parse_args(argv)
    images, _ = source_images(1)
    original = AE.associate
    with tempfile.TemporaryDirectory(prefix="dermnode-bench-nodelay-") as tmp:
        work = Path(tmp)
        src = write_dicoms(work / "src", 1, jpeg=True, images=images)[0]
        analyze_files(load_settings(None), [src.path], work / "out")
        out = next((work / "out").iterdir())
        for orthanc_env in ({}, {"TCP_NODELAY": "1"}):
            with environment(orthanc_env):
                orthanc = start_orthanc(work / f"orthanc{len(orthanc_env)}")
            try:
                dest = PacsDestination(name="o", ae_title=orthanc.aet, host="127.0.0.1", port=orthanc.dicom_port)
                variants = (("dermnode as is", original), ("dermnode TCP_NODELAY", patched_associate(original)))
                for label, assoc in variants:
                    AE.associate = assoc  # type: ignore[method-assign]
                    for name in ("seg.dcm", "sr.dcm"):
                        times = []
                        for _ in range(args.repeats):
                            t = time.perf_counter()
                            send_files(dest, "DERMNODE", [out / name])
                            times.append((time.perf_counter() - t) * 1000)
                        print(f"Orthanc {'TCP_NODELAY=1' if orthanc_env else 'DCMTK default'}, {label:21s} "
                              f"{name} ({(out / name).stat().st_size // 1024} kB): median "
                              f"{statistics.median(times):6.1f} ms per delivery ({args.repeats} runs)", flush=True)
            finally:
                AE.associate = original  # type: ignore[method-assign]
                orthanc.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
