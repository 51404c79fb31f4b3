"""imgserver over HTTP vs the raw Pillow pipeline: 256x256 crop JPEG q80 thumbnails.

    python bench/server_throughput.py CORPUS [--seconds 8] [--rounds 4] [--connections 64]
                                             [--workers 2] [--processes N] [--profile OUT]

imgserver runs as a subprocess (this checkout; ``--workers 2``, result cache
off, a queue big enough that nothing is refused) on 127.0.0.1 and serves
``/images/<jpeg>?w=256&h=256&fit=crop&fm=jpg&q=80`` for every JPEG of the
corpus in turn to wrk (C, one thread, keep-alive, ``--connections`` at once).
The server's root is a temporary directory of copies of the corpus JPEGs,
several names per image, so that no two requests in flight are identical:
imgserver shares one processing among identical requests, and cycling 24 URLs
over 64 connections would measure that sharing (several times the raw rate),
not the processing.  The table shows how many requests were shared (should be 0).
The baselines are ``bench.pipeline.raw_pipeline_rate``: the same
``processing`` function on the same images, already in memory, in as many
plain threads as the server has workers, with no HTTP, no reactor and no
load generator; and ``bench.quality.plain_pillow_rate``: the plain-Pillow
loop of the same resize pipeline (draft, convert, one resize, JPEG into a
memfd: no imgserver code), the cheapest loop that reaches imgserver's output
quality (see bench/quality.py; issue 12's target: imgserver >= 95% of it).
``--processes N`` (``auto`` = the core count) runs the server as a parent
with N worker processes sharing the port, each with ``--workers`` threads
(the baselines keep ``--workers`` threads: the machine's cores are the limit
either way); its CPU is that of all its processes, and its counters are
summed over the workers.  Rounds alternate the two, so machine noise hits both; the
summary gives the best round of each, the median of the per-round ratios and
images per CPU-second (which other processes on a shared machine disturb
least).

wrk shares the 2 cores with the server: its own CPU use is printed (CPU
seconds per second), as is the server's and the share of the machine left
idle.  ``--profile OUT`` adds an extra, unmeasured server run under
``py-spy record`` (pip install py-spy) and prints where the server's time
went (every process of it with ``--processes``); the collapsed stacks are written to OUT.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Sequence

import _common  # noqa: F401  (puts the project on sys.path)
import _servers
from _common import table

import pipeline
from pipeline import corpus_files, raw_pipeline_rate
from quality import plain_pillow_rate
from server_burst import metric_by, metric_sum, parse_processes, processes_args, settled_scrape, start_server

QUERY = "w=256&h=256&fit=crop&fm=jpg&q=80"


def image_paths(root: str, files: Sequence[str], query: str = QUERY) -> list[str]:
    from urllib.parse import quote

    return [f"/images/{quote(os.path.relpath(p, root))}?{query}" for p in files]


def wait_idle(server: _servers.Proc, port: int, processes: int) -> None:
    """Until the work left from a load run is done (the server's queue empty and its CPU quiet)."""
    if processes == 1:
        _servers.wait_imgserver_idle(port)
    else:  # /healthz answers for the whole server or one worker, depending on the design: use CPU
        _servers.wait_quiet(server.pids())


def profile_server(pid: int, port: int, paths: list[str], connections: int, seconds: float,
                   out: str, workdir: str, *, subprocesses: bool = False,
                   idle: Any = None) -> None:
    """py-spy the server (all threads, native frames off, idle off) under the same load."""
    rate = 200
    py_spy = shutil.which("py-spy")
    if not py_spy:
        print("\n--profile: py-spy not found (pip install py-spy)")
        return
    argv = [py_spy, "record", "--pid", str(pid), "--duration", str(int(seconds)), "--rate", str(rate),
            "--format", "raw", "--output", out, "--threads", "--nonblocking",
            *(["--subprocesses"] if subprocesses else [])]
    spy = _servers.Proc("py-spy", argv, log=out + ".log")
    time.sleep(1.0)
    _servers.run_wrk(port, paths, connections=connections, seconds=seconds, workdir=workdir)
    try:
        spy.popen.wait(seconds + 30)
    except subprocess.TimeoutExpired:
        pass
    spy.stop()
    if idle is not None:
        idle()
    else:
        _servers.wait_imgserver_idle(port)
    if not os.path.exists(out):
        print(f"\n--profile: py-spy wrote nothing:\n{spy.tail()}")
        return
    print(f"\nProfile of the server under the same load (py-spy, {seconds:g} s, stacks in {out}):")
    print(summarize_profile(out, rate * seconds))


def summarize_profile(path: str, samples_per_thread: float, top: int = 12) -> str:
    """Busy share per thread, then the top functions by self time, overall and in
    the reactor (main) thread.  py-spy without ``--idle`` leaves out samples of
    threads that are waiting (sleeping, blocked in a system call, waiting for the GIL)."""
    busy: collections.Counter[str] = collections.Counter()
    self_all: collections.Counter[str] = collections.Counter()
    incl_all: collections.Counter[str] = collections.Counter()
    self_main: collections.Counter[str] = collections.Counter()
    incl_main: collections.Counter[str] = collections.Counter()
    total = main_total = 0
    with open(path) as f:
        for line in f:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if not stack:
                continue
            n = int(count)
            frames = stack.split(";")
            thread = frames[0].partition("): ")[2] or frames[0]
            thread = re.sub(r"-\d+$", "-*", thread)
            funcs = [_short(fr) for fr in frames[1:]] or [thread]
            busy[thread] += n
            total += n
            self_all[funcs[-1]] += n
            for fn in set(funcs):
                incl_all[fn] += n
            if thread == "MainThread":
                main_total += n
                self_main[funcs[-1]] += n
                for fn in set(funcs):
                    incl_main[fn] += n
    if not total:
        return "(no samples)"
    rows = [[t, n, f"{100 * n / total:.1f}%", f"{n / samples_per_thread:.2f}"] for t, n in busy.most_common()]
    out = [table(["thread (* = several)", "samples", "share", "busy (threads)"], rows), ""]
    rows = [[fn, f"{100 * n / total:.1f}%", f"{100 * incl_all[fn] / total:.1f}%"]
            for fn, n in self_all.most_common(top)]
    out += [table(["all threads: function", "self", "inclusive"], rows), ""]
    if main_total:
        rows = [[fn, f"{100 * n / main_total:.1f}%", f"{100 * incl_main[fn] / main_total:.1f}%"]
                for fn, n in self_main.most_common(top)]
        out.append(table(["reactor thread: function", "self", "inclusive"], rows))
    return "\n".join(out)


def _short(frame: str) -> str:
    # "func (path/to/module.py:123)" -> "func (module.py)"
    name, _, where = frame.partition(" (")
    where = where.rstrip(")")
    base = os.path.basename(where.rsplit(":", 1)[0]) if where else ""
    return f"{name} ({base})" if base else name


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("corpus", help="directory of images (its JPEGs are used)")
    parser.add_argument("--seconds", type=float, default=8.0, help="seconds per measured run (default 8)")
    parser.add_argument("--rounds", type=int, default=4, help="rounds of (server, raw), alternated (default 4)")
    parser.add_argument("--connections", type=int, default=64, help="concurrent connections (default 64)")
    parser.add_argument("--workers", type=int, default=2,
                        help="server workers (per process) = raw pipeline threads (default 2)")
    parser.add_argument("--processes", default="1",
                        help="server processes (auto = the core count; default 1: no parent)")
    parser.add_argument("--max-queue", type=int, default=1000, help="server --max-queue (default 1000)")
    parser.add_argument("--warmup", type=float, default=3.0, help="unmeasured server load first, seconds")
    parser.add_argument("--profile", metavar="OUT", help="also profile the server with py-spy; stacks to OUT")
    args = parser.parse_args(argv)
    _servers.install_cleanup()
    try:
        processes = parse_processes(args.processes)
    except ValueError as e:
        parser.error(str(e))
    if len(processes) != 1:
        parser.error("--processes: one number here (bench/server_burst.py takes a list)")
    nproc = processes[0]

    if not _servers.wrk_available():
        print("wrk not found: install it (Debian: apt-get install wrk)", file=sys.stderr)
        return 2
    corpus = os.path.abspath(args.corpus)
    jpegs = corpus_files(corpus, (".jpg", ".jpeg"))
    if not jpegs:
        parser.error(f"no JPEG files in {corpus}")
    work = tempfile.mkdtemp(prefix="bench-throughput-")
    root = os.path.join(work, "images")
    copies = max(1, -(-4 * args.connections // len(jpegs)))
    paths = image_paths(root, _servers.link_copies(jpegs, copies, root))
    _servers.raise_fd_limit()

    server, port = start_server(root, nproc, workers=args.workers, max_queue=args.max_queue,
                                cache_mb=0, log_dir=work)
    settle = lambda: wait_idle(server, port, nproc)
    try:
        status, _ = _servers.http_get(port, paths[0], timeout=30)
        if status != 200:
            raise RuntimeError(f"imgserver answered {status} for {paths[0]}:\n{server.tail()}")
        print(f"{len(jpegs)} corpus JPEGs -> 256x256 crop JPEG q80; {os.cpu_count()} CPUs; "
              f"load average {_servers.load_average()}")
        pids = server.pids()
        print(f"server: imgserver (this checkout) {' '.join(processes_args(nproc) + [''])}--workers {args.workers} "
              f"--cache-mb 0 --max-queue {args.max_queue} --quiet, pid{'s' if len(pids) > 1 else ''} "
              f"{', '.join(map(str, pids))}")
        print(f"load:   {_servers.wrk_version()}, 1 thread, {args.connections} keep-alive connections, "
              f"{len(paths)} URLs cycled ({copies} copies per JPEG)")
        print(f"raw:    bench.pipeline.raw_pipeline_rate, {args.workers} threads, images in memory")
        print(f"{args.rounds} rounds of {args.seconds:g} s each (server, raw and plain loop, alternated)\n")

        if args.warmup > 0:
            _servers.run_wrk(port, paths, connections=args.connections, seconds=args.warmup, workdir=work)
            settle()

        rows = []
        rates: dict[str, list[float]] = {"server": [], "raw": [], "plain": []}
        per_cpu: dict[str, list[float]] = {"server": [], "raw": [], "plain": []}
        problems = 0
        for r in range(args.rounds):
            order = ("server", "raw", "plain") if r % 2 == 0 else ("plain", "raw", "server")
            for which in order:
                if which == "server":
                    before = settled_scrape(port, nproc)
                    with _servers.Window(server.pids()) as win:
                        res = _servers.run_wrk(port, paths, connections=args.connections,
                                               seconds=args.seconds, workdir=work)
                    settle()
                    after = settled_scrape(port, nproc)
                    shared = metric_sum(after, "imgserver_coalesced_total") - metric_sum(
                        before, "imgserver_coalesced_total")
                    spread = ""
                    if nproc > 1:  # how the work spread over the workers (the run and its tail)
                        done = metric_by(after, "imgserver_processing_seconds_count", "worker")
                        done0 = metric_by(before, "imgserver_processing_seconds_count", "worker")
                        spread = "; processed per worker " + "/".join(
                            f"{done[w] - done0.get(w, 0):.0f}" for w in sorted(done))
                    rate, cpu = res.ok_rate, win.cpu_per_s
                    problems += res.other
                    label = f"imgserver over HTTP ({args.connections} conns)" if nproc == 1 else \
                        f"imgserver, {nproc} processes, over HTTP ({args.connections} conns)"
                    rows.append([label, r + 1, rate,
                                 f"{cpu:.2f}", rate / cpu, f"{res.cpu / res.seconds:.2f}", f"{win.idle:.2f}",
                                 f"{res.latency_ms['p50']:.0f} / {res.latency_ms['p99']:.0f}",
                                 f"{res.ok} ok, {res.other} other, {shared:.0f} shared{spread}"])
                else:
                    idle0 = _servers.system_idle()
                    if which == "raw":
                        rate = raw_pipeline_rate(jpegs, args.workers, args.seconds)
                        label = f"raw pipeline ({args.workers} threads)"
                    else:
                        rate = plain_pillow_rate(jpegs, args.workers, args.seconds)
                        label = f"plain Pillow loop ({args.workers} threads)"
                    cpu = pipeline.last_cpu_use
                    idle = _servers.idle_share(idle0, _servers.system_idle())
                    rows.append([label, r + 1, rate, f"{cpu:.2f}", rate / cpu, "-", f"{idle:.2f}", "-", "-"])
                rates[which].append(rate)
                per_cpu[which].append(rate / cpu)

        print(table(["approach", "round", "images/s", "cpu s/s", "images/cpu-s", "wrk cpu s/s", "idle",
                     "p50 / p99 ms", "answers"], rows))
        print()
        pct = lambda a, b: f"{100 * a / b:.0f}%" if b else "n/a"
        paired = sorted(s / r for s, r in zip(rates["server"], rates["raw"]))
        summary = [
            ["images/s, best round of each", max(rates["server"]), max(rates["raw"]),
             pct(max(rates["server"]), max(rates["raw"]))],
            ["images/s, median of the per-round ratios", "-", "-", f"{100 * statistics.median(paired):.0f}%"],
            ["images per CPU-second, best round of each", max(per_cpu["server"]), max(per_cpu["raw"]),
             pct(max(per_cpu["server"]), max(per_cpu["raw"]))],
        ]
        print(table(["imgserver vs raw pipeline (target >= 85%)", "imgserver", "raw", "ratio"], summary))
        print()
        paired = sorted(s / p for s, p in zip(rates["server"], rates["plain"]))
        summary = [
            ["images/s, best round of each", max(rates["server"]), max(rates["plain"]),
             pct(max(rates["server"]), max(rates["plain"]))],
            ["images/s, median of the per-round ratios", "-", "-", f"{100 * statistics.median(paired):.0f}%"],
            ["images per CPU-second, best round of each", max(per_cpu["server"]), max(per_cpu["plain"]),
             pct(max(per_cpu["server"]), max(per_cpu["plain"]))],
        ]
        print(table(["imgserver vs plain Pillow loop (target >= 95%)", "imgserver", "plain", "ratio"], summary))
        print("\ncpu s/s: CPU seconds per second used by the server's processes (all threads) or by the "
              "raw pipeline's process; images/cpu-s: images per CPU-second (less sensitive to other "
              "processes on the machine); wrk cpu: the load generator's; idle: share of the machine's "
              "CPU left idle; shared: requests answered by another identical request's processing.")
        print(f"load average after: {_servers.load_average()}")
        if problems:
            print(f"WARNING: {problems} answers were not 200 (or failed)")
        if args.profile:
            profile_server(server.pid, port, paths, args.connections, args.seconds,
                           os.path.abspath(args.profile), work, subprocesses=nproc > 1, idle=settle)
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    _servers.run_main(main)
