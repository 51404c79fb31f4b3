"""imgserver vs thumbor 7, side by side: 256x256 crop thumbnails of the corpus JPEGs.

    python bench/vs_thumbor.py CORPUS [--thumbor-venv DIR] [--seconds 15] [--rounds 2]
                                      [--connections 64] [--thumbor-processes 1]

thumbor is installed in a virtualenv of its own (``--thumbor-venv``, default
``$TMPDIR/thumbor-venv``; created with ``python -m venv`` and ``pip install
'thumbor==7.*'`` when it is missing, never into this project's environment).
Both servers run as subprocesses on 127.0.0.1 and serve the same files: a
temporary directory of copies of the corpus JPEGs, several names per
image, so that no two requests in flight are the same (imgserver shares one
processing among identical requests; thumbor does not).

* thumbor: file loader (``FILE_LOADER_ROOT_PATH`` = that directory), no
  storage of originals and no result storage, ``ENGINE_THREADPOOL_SIZE`` =
  2 x CPUs, unsafe URLs: ``/unsafe/256x256/<file>`` (centre crop, JPEG at its
  default QUALITY 80), ``--thumbor-processes`` processes (thumbor's default 1).
* imgserver (this checkout): ``--workers`` = CPUs, result cache off, a queue
  big enough that nothing is refused:
  ``/images/<file>?w=256&h=256&fit=crop&fm=jpg&q=80``.

The same load generator (``bench/_load.py``: asyncio, one thread,
``--connections`` keep-alive connections, URLs cycled; at these rates it
costs a few percent of a core) drives each through ``--warmup`` seconds and
then a ``--seconds`` window, without a pause; rounds alternate the servers
(the idle one uses no CPU).  It is used rather than wrk because thumbor
answers in waves (all 64 requests share its thread pool and finish together),
and counting answers in a window of a few waves is off by up to a wave;
``_load`` counts work in progress at the window's edges in part (Little's
law) and also prints the plain count.  Reported: requests/s (200 answers),
latency, CPU use, and the peak RSS of each server (VmHWM, summed over its
processes) over the whole run.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from typing import Any, Sequence
from urllib.parse import quote

import _common  # noqa: F401  (puts the project on sys.path)
import _load
import _servers
from _common import table
from pipeline import corpus_files

THUMBOR_SPEC = "thumbor==7.*"


def ensure_thumbor(venv: str) -> tuple[str | None, str]:
    """(path of the thumbor script, version) or (None, what failed)."""
    thumbor = os.path.join(venv, "bin", "thumbor")
    python = os.path.join(venv, "bin", "python")

    def version() -> str | None:
        if not os.path.exists(thumbor):
            return None
        try:
            out = subprocess.run([python, "-c", "import thumbor; print(thumbor.__version__)"],
                                 capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.SubprocessError):
            return None
        v = out.stdout.strip()
        return v if out.returncode == 0 and v.startswith("7.") else None

    found = version()
    if found:
        return thumbor, found
    if not os.path.exists(python):
        print(f"creating a virtualenv for thumbor in {venv} ...", flush=True)
        out = subprocess.run([sys.executable, "-m", "venv", venv], capture_output=True, text=True)
        if out.returncode != 0:
            return None, (f"`{sys.executable} -m venv {venv}` failed (exit {out.returncode}):\n"
                          + (out.stdout + out.stderr)[-2000:])
    print(f"installing {THUMBOR_SPEC!r} into {venv} (pip; a minute or two) ...", flush=True)
    try:
        out = subprocess.run([python, "-m", "pip", "install", "-q", THUMBOR_SPEC],
                             capture_output=True, text=True, timeout=900)
    except subprocess.TimeoutExpired:
        return None, f"`{python} -m pip install '{THUMBOR_SPEC}'` did not finish in 15 minutes"
    if out.returncode != 0:
        return None, (f"`{python} -m pip install '{THUMBOR_SPEC}'` failed (exit {out.returncode}):\n"
                      + (out.stdout + out.stderr)[-3000:])
    found = version()
    if not found:
        return None, f"thumbor was installed in {venv} but `import thumbor` does not give a 7.x version"
    return thumbor, found


def thumbor_pillow(venv: str) -> str:
    try:
        out = subprocess.run([os.path.join(venv, "bin", "python"), "-c",
                              "import PIL, tornado; print(PIL.__version__, tornado.version)"],
                             capture_output=True, text=True, timeout=60)
        pil, tornado = out.stdout.split()
        return f"Pillow {pil}, Tornado {tornado}"
    except (OSError, ValueError, subprocess.SubprocessError):
        return "?"


def start_thumbor(thumbor: str, root: str, work: str, threads: int, processes: int) -> tuple[_servers.Proc, int]:
    port = _servers.free_port()
    conf = os.path.join(work, "thumbor.conf")
    with open(conf, "w") as f:
        f.write(
            "LOADER = 'thumbor.loaders.file_loader'\n"
            f"FILE_LOADER_ROOT_PATH = {root!r}\n"
            "STORAGE = 'thumbor.storages.no_storage'\n"
            "RESULT_STORAGE = None\n"
            f"ENGINE_THREADPOOL_SIZE = {threads}\n"
            "ALLOW_UNSAFE_URL = True\n"
            "QUALITY = 80\n"
        )
    argv = [thumbor, "--ip", _servers.HOST, "--port", str(port), "--conf", conf,
            "--processes", str(processes), "--log-level", "error"]
    proc = _servers.Proc("thumbor", argv, cwd=work, log=os.path.join(work, "thumbor.log"))
    _servers.wait_http(proc, port, "/healthcheck", timeout=60)
    return proc, port


def check_output(port: int, path: str, name: str) -> int:
    """Bytes of one answer, after checking it is a 256x256 JPEG."""
    import io

    from PIL import Image

    status, body = _servers.http_get(port, path, timeout=60)
    if status != 200:
        raise RuntimeError(f"{name} answered {status} for {path}: {body[:300]!r}")
    with Image.open(io.BytesIO(body)) as im:
        if im.format != "JPEG" or im.size != (256, 256):
            raise RuntimeError(f"{name} gave a {im.format} {im.size} for {path}")
    return len(body)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("corpus", help="directory of images (its JPEGs are used)")
    parser.add_argument("--thumbor-venv", default=os.path.join(tempfile.gettempdir(), "thumbor-venv"),
                        help="virtualenv holding thumbor 7 (created if missing; default $TMPDIR/thumbor-venv)")
    parser.add_argument("--seconds", type=float, default=15.0, help="measured window per run, seconds (default 15)")
    parser.add_argument("--rounds", type=int, default=2, help="measured runs of each server, alternated (default 2)")
    parser.add_argument("--connections", type=int, default=64, help="concurrent connections (default 64)")
    parser.add_argument("--warmup", type=float, default=5.0,
                        help="load before each window, seconds, not measured (default 5)")
    parser.add_argument("--thumbor-processes", type=int, default=1, help="thumbor --processes (default 1)")
    args = parser.parse_args(argv)
    _servers.install_cleanup()

    corpus = os.path.abspath(args.corpus)
    jpegs = corpus_files(corpus, (".jpg", ".jpeg"))
    if not jpegs:
        parser.error(f"no JPEG files in {corpus}")
    thumbor, thumbor_version = ensure_thumbor(os.path.abspath(args.thumbor_venv))
    if thumbor is None:
        print(f"\nCannot run thumbor, so no comparison: {thumbor_version}", file=sys.stderr)
        return 2

    cpus = os.cpu_count() or 1
    work = tempfile.mkdtemp(prefix="bench-vs-thumbor-")
    root = os.path.join(work, "images")
    copies = max(1, -(-4 * args.connections // len(jpegs)))
    files = [quote(os.path.relpath(p, root)) for p in _servers.link_copies(jpegs, copies, root)]
    paths = {
        "imgserver": [f"/images/{f}?w=256&h=256&fit=crop&fm=jpg&q=80" for f in files],
        "thumbor": [f"/unsafe/256x256/{f}" for f in files],
    }
    _servers.raise_fd_limit()

    servers: dict[str, tuple[_servers.Proc, int]] = {}
    try:
        servers["imgserver"] = _servers.start_imgserver(root, workers=cpus, max_queue=1000, cache_mb=0,
                                                        log_dir=work)
        servers["thumbor"] = start_thumbor(thumbor, root, work, threads=2 * cpus,
                                           processes=args.thumbor_processes)
        sizes = {name: check_output(port, paths[name][0], name) for name, (_, port) in servers.items()}

        print(f"{len(jpegs)} corpus JPEGs -> 256x256 centre crop, JPEG q80; {cpus} CPUs; "
              f"load average {_servers.load_average()}")
        print(f"imgserver: this checkout, --workers {cpus} --cache-mb 0 --max-queue 1000 --quiet "
              f"(Pillow {__import__('PIL').__version__})")
        print(f"thumbor:   {thumbor_version} in {args.thumbor_venv} ({thumbor_pillow(args.thumbor_venv)}), "
              f"file loader, no storage, no result storage, ENGINE_THREADPOOL_SIZE={2 * cpus}, "
              f"--processes {args.thumbor_processes}")
        print(f"load:      bench/_load.py (asyncio, one thread, in this process), {args.connections} keep-alive "
              f"connections, {len(files)} URLs cycled ({copies} copies per JPEG); per run "
              f"{args.warmup:g} s warm-up then a {args.seconds:g} s window, continuous; {args.rounds} runs "
              f"each, alternated")
        print(f"first thumbnail: imgserver {sizes['imgserver']:,} bytes, thumbor {sizes['thumbor']:,} bytes\n")

        def settle(name: str) -> None:
            proc, port = servers[name]
            if name == "imgserver":
                _servers.wait_imgserver_idle(port)
            _servers.wait_quiet(proc.pids())

        rows: list[list[Any]] = []
        rates: dict[str, list[float]] = {"imgserver": [], "thumbor": []}
        per_cpu: dict[str, list[float]] = {"imgserver": [], "thumbor": []}
        problems = 0
        for r in range(args.rounds):
            order = ("imgserver", "thumbor") if r % 2 == 0 else ("thumbor", "imgserver")
            for name in order:
                proc, port = servers[name]
                win = _servers.Window(proc.pids())
                res = _load.closed_loop(port, paths[name], connections=args.connections,
                                        warmup=args.warmup, seconds=args.seconds, mark=win.mark)
                problems += res.failures
                rate, cpu = res.rate, win.cpu_per_s
                rates[name].append(rate)
                per_cpu[name].append(rate / cpu if cpu else float("nan"))
                statuses = res.statuses()
                rows.append([name, r + 1, rate, res.answered_rate, f"{cpu:.2f}",
                             rate / cpu if cpu else "-", f"{res.cpu / res.wall:.2f}", f"{win.idle:.2f}",
                             f"{res.percentile_ms(50):.0f} / {res.percentile_ms(99):.0f}",
                             ", ".join(f"{n} x {st}" for st, n in sorted(statuses.items())) or "none"])
                settle(name)

        rss = {name: _servers.peak_rss_mb(proc.pids()) for name, (proc, _) in servers.items()}
        nprocs = {name: len(proc.pids()) for name, (proc, _) in servers.items()}
        print(table(["server", "run", "requests/s", "answered/s", "cpu s/s", "req/cpu-s", "load gen cpu s/s",
                     "idle", "p50 / p99 ms", "answers in window"], rows))
        print()
        ratio = lambda a, b: f"{a / b:.2f}x" if b else "n/a"
        best_i, best_t = max(rates["imgserver"]), max(rates["thumbor"])
        paired = [i / t for i, t in zip(rates["imgserver"], rates["thumbor"]) if t]
        summary = [
            ["requests/s, best run of each", best_i, best_t, ratio(best_i, best_t), ">= 1.5x"],
            ["requests/s, median of the per-round ratios", "-", "-",
             f"{statistics.median(paired):.2f}x" if paired else "n/a", ">= 1.5x"],
            ["requests per CPU-second, best run of each", max(per_cpu["imgserver"]), max(per_cpu["thumbor"]),
             ratio(max(per_cpu["imgserver"]), max(per_cpu["thumbor"])), ""],
            [f"peak RSS, MiB (VmHWM; processes: {nprocs['imgserver']} / {nprocs['thumbor']})",
             rss["imgserver"], rss["thumbor"], ratio(rss["imgserver"], rss["thumbor"]), "< 0.5x"],
        ]
        print(table(["imgserver vs thumbor", "imgserver", "thumbor", "ratio", "target"], summary))
        print("\nrequests/s: 200 answers per second in the window, each request counted for the share "
              "of its lifetime inside the window (Little's law; thumbor answers in waves, see "
              "bench/_load.py); answered/s: plain count of 200 answers that arrived in the window; "
              "cpu s/s: the server's CPU seconds per second in the window (all its processes and "
              "threads); req/cpu-s: requests per CPU-second; load gen cpu: the load generator's, "
              "over its whole run; idle: share of the machine's CPU left idle in the window.")
        print(f"load average after: {_servers.load_average()}")
        if problems:
            print(f"WARNING: {problems} answers were not 200 (or failed)")
    finally:
        for proc, _ in servers.values():
            proc.stop()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    _servers.run_main(main)
