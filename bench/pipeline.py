"""Raw Pillow pipeline throughput: the ceiling the image server is measured against.

    python bench/pipeline.py CORPUS_DIR [--seconds 5] [--threads 1,2]

Everything runs on images already in memory (no file I/O, no HTTP, no
reactor), in plain threads, so the figures are what ``imgserver.processing``
can do on this machine.  Printed rows:

* ``transform`` of the corpus JPEGs to a 256x256 centre crop at q80 (the
  server benchmark's workload), with the normal memfd encoder and with an
  ``io.BytesIO`` encoder;
* the same to a 1920-wide JPEG, where encoding is a larger share of the work;
* encoding alone (a decoded corpus JPEG back to JPEG q80) into a memfd and
  into ``io.BytesIO``: Pillow releases the GIL only for the former;
* ``transform`` of the whole corpus (JPEG, PNG and WebP) to 256x256.

Each ``transform`` cell runs for ``--seconds`` and at least one full pass over
its images, so 1- and 2-thread cells do comparable work; each cell is
measured ``--repeat`` times, interleaved, and the best kept (other processes
on the machine only ever slow a run down).  The ``cpu`` and ``idle`` figures
tell GIL serialisation (low cpu, idle CPUs) from competition (no idle CPUs).

``raw_pipeline_rate(paths, threads, seconds)`` is importable for the server
benchmark's baseline.
"""

from __future__ import annotations

import argparse
import glob
import itertools
import os
import platform
import random
import sys
import threading
import time
from collections.abc import Callable, Sequence

# Benchmark the checkout this file belongs to, even if another copy of
# imgserver is installed (e.g. an editable install of a different worktree).
_CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if sys.path[:1] != [_CHECKOUT]:
    sys.path.insert(0, _CHECKOUT)

from PIL import Image, features  # noqa: E402

from imgserver import processing  # noqa: E402
from imgserver.params import TransformSpec  # noqa: E402

#: The server benchmark's workload: 256x256 centre crop, JPEG quality 80.
DEFAULT_SPEC = TransformSpec(width=256, height=256, fit="crop", format="jpeg", quality=80)
MAX_PIXELS = 50_000_000

#: CPU seconds per wall second of the last measurement (see _run_threads).
last_cpu_use = 0.0
#: Fraction of the machine's CPU time left idle during the last measurement.
last_idle = float("nan")


def _system_idle() -> tuple[int, int] | None:
    """(idle + iowait, total) jiffies over all CPUs, from /proc/stat."""
    try:
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    return values[3] + values[4], sum(values)


_ENCODERS = {"memfd": processing._encode_to_fd, "bytesio": processing._encode_to_bytesio}


def _run_threads(
    work: Callable[[int], None], threads: int, seconds: float, min_items: int = 0
) -> float:
    """Call ``work(i)`` with increasing i from ``threads`` threads; items/s.

    Runs for ``seconds`` and until at least ``min_items`` items have been
    started, so that runs with different thread counts all cover the same
    items at least once (a fair comparison when items differ in cost).

    Also records, in module globals, ``last_cpu_use``: the process CPU time
    per wall-clock second (about ``threads`` when the threads really run in
    parallel, about 1 when the GIL serialises them), and ``last_idle``: the
    fraction of all CPUs left idle meanwhile (Linux).  Low CPU use with idle
    CPUs means the GIL; with no idle CPUs, other processes competing.
    """
    global last_cpu_use, last_idle
    counter = itertools.count()  # next() on it is atomic under the GIL
    done = [0] * threads
    stop = threading.Event()
    errors: list[BaseException] = []

    def loop(slot: int) -> None:
        try:
            while True:
                i = next(counter)
                if i >= min_items and stop.is_set():
                    return
                work(i)
                done[slot] += 1
        except BaseException as e:  # pragma: no cover - surfaced below
            errors.append(e)

    workers = [threading.Thread(target=loop, args=(slot,), daemon=True) for slot in range(threads)]
    cpu_start = time.process_time()
    idle_start = _system_idle()
    start = time.perf_counter()
    for w in workers:
        w.start()
    stop.wait(seconds)
    stop.set()
    for w in workers:
        w.join()
    elapsed = time.perf_counter() - start  # includes finishing the last items
    last_cpu_use = (time.process_time() - cpu_start) / elapsed
    idle_end = _system_idle()
    last_idle = float("nan")
    if idle_start and idle_end and idle_end[1] > idle_start[1]:
        last_idle = (idle_end[0] - idle_start[0]) / (idle_end[1] - idle_start[1])
    if errors:
        raise errors[0]
    return sum(done) / elapsed


def raw_pipeline_rate(
    paths: Sequence[str],
    threads: int,
    seconds: float,
    spec: TransformSpec = DEFAULT_SPEC,
    *,
    encoder: str = "memfd",
    max_pixels: int = MAX_PIXELS,
) -> float:
    """Images/s of ``processing.transform(data, spec)`` over ``paths`` (read first).

    The files are put in a fixed pseudo-random order; ``threads`` threads each
    transform the next one, round robin, for ``seconds`` and at least one
    full pass (so a mixed corpus is measured whole, whatever the thread
    count).  ``encoder`` is ``"memfd"`` (what the server uses) or
    ``"bytesio"`` (for comparison).  No file I/O is timed.
    """
    datas = []
    for path in paths:
        with open(path, "rb") as f:
            datas.append(f.read())
    random.Random(0).shuffle(datas)
    if not datas:
        raise ValueError("no images given")
    encode = _ENCODERS[encoder]
    for data in datas[:2]:  # warm up lazy plugin imports
        processing._transform(data, spec, max_pixels, encode)

    def work(i: int) -> None:
        processing._transform(datas[i % len(datas)], spec, max_pixels, encode)

    return _run_threads(work, threads, seconds, min_items=len(datas))


def encode_rate(
    image: Image.Image, threads: int, seconds: float, encoder: str, quality: int = 80
) -> float:
    """Images/s of encoding ``image`` as JPEG at ``quality`` with ``encoder``."""
    encode = _ENCODERS[encoder]
    params = {"quality": quality, "optimize": False, "progressive": False}
    encode(image, "jpeg", params)
    return _run_threads(lambda i: encode(image, "jpeg", params), threads, seconds)


def _load() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def corpus_files(corpus: str, extensions: tuple[str, ...]) -> list[str]:
    return sorted(
        p
        for p in glob.glob(os.path.join(corpus, "*"))
        if p.lower().endswith(extensions) and os.path.isfile(p)
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("corpus", help="directory of JPEG/PNG/WebP images")
    parser.add_argument(
        "--seconds", type=float, default=5.0, help="seconds per measurement (default 5)"
    )
    parser.add_argument("--threads", default="1,2", help="thread counts to compare (default 1,2)")
    parser.add_argument(
        "--repeat",
        type=int,
        default=3,
        help="measure each cell this many times, interleaved, and keep the best (default 3)",
    )
    args = parser.parse_args(argv)
    thread_counts = [int(t) for t in args.threads.split(",")]

    jpegs = corpus_files(args.corpus, (".jpg", ".jpeg"))
    everything = corpus_files(args.corpus, (".jpg", ".jpeg", ".png", ".webp"))
    if not jpegs:
        parser.error(f"no JPEG files in {args.corpus}")

    with Image.open(jpegs[0]) as first:
        big = first.convert("RGB")
        big.load()

    print(
        f"Python {platform.python_version()}, Pillow {Image.__version__} "
        f"(libjpeg-turbo {features.version('jpg')}, libwebp {features.version('webp')}), "
        f"{os.cpu_count()} CPUs, {args.seconds:g} s per cell"
    )
    print(
        f"corpus: {len(jpegs)} JPEGs, {len(everything)} images in all; "
        f"encode-only image: {os.path.basename(jpegs[0])} {big.size[0]}x{big.size[1]}"
    )

    wide = TransformSpec(width=1920, fit="clip", format="jpeg", quality=80)
    rows: list[tuple[str, str, Callable[[int], float]]] = [
        (
            "transform JPEG -> 256x256 crop q80",
            "memfd",
            lambda t: raw_pipeline_rate(jpegs, t, args.seconds),
        ),
        (
            "transform JPEG -> 256x256 crop q80",
            "BytesIO",
            lambda t: raw_pipeline_rate(jpegs, t, args.seconds, encoder="bytesio"),
        ),
        (
            "transform JPEG -> w=1920 q80",
            "memfd",
            lambda t: raw_pipeline_rate(jpegs, t, args.seconds, wide),
        ),
        (
            "transform JPEG -> w=1920 q80",
            "BytesIO",
            lambda t: raw_pipeline_rate(jpegs, t, args.seconds, wide, encoder="bytesio"),
        ),
        (
            f"encode only {big.size[0]}x{big.size[1]} -> JPEG q80",
            "memfd",
            lambda t: encode_rate(big, t, args.seconds, "memfd"),
        ),
        (
            f"encode only {big.size[0]}x{big.size[1]} -> JPEG q80",
            "BytesIO",
            lambda t: encode_rate(big, t, args.seconds, "bytesio"),
        ),
        (
            "transform all formats -> 256x256 crop q80",
            "memfd",
            lambda t: raw_pipeline_rate(everything, t, args.seconds),
        ),
    ]

    print(f"load average before: {_load()}")
    header = (
        f"| {'workload':<42} | {'encoder':<7} | "
        + " | ".join(f"{t} thr img/s (cpu, idle)" for t in thread_counts)
        + f" | {thread_counts[-1]}/{thread_counts[0]} |"
    )
    print()
    print(header)
    print("|" + "|".join("-" * len(cell) for cell in header.strip("|").split("|")) + "|")
    for name, encoder, measure in rows:
        best = {t: (0.0, 0.0, 0.0) for t in thread_counts}
        for _ in range(args.repeat):
            for t in thread_counts:
                rate = measure(t)
                if rate > best[t][0]:
                    best[t] = (rate, last_cpu_use, last_idle)
        cells = " | ".join(
            f"{best[t][0]:>{len(str(t)) + 9}.1f} ({best[t][1]:.2f}, {best[t][2]:.2f})"
            for t in thread_counts
        )
        ratio = best[thread_counts[-1]][0] / best[thread_counts[0]][0]
        print(f"| {name:<42} | {encoder:<7} | {cells} | {ratio:.2f}x |", flush=True)
    print()
    print(f"load average after: {_load()}")
    print(
        "cpu = process CPU seconds per wall second (2.0 = two cores busy, ~1.0 = serialised); "
        "idle = share of all CPUs idle meanwhile (near 0 = other processes competed)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
