"""Hit latency of imgserver's result tiers: the in-memory cache vs the on-disk result store vs memcached.

    python bench/result_tiers.py CORPUS [--seconds 3] [--connections 1] [--widths 2] [--all-formats]
                                        [--processes N] [--memcached HOST:PORT] [--result-dir DIR]
                                        [--cells memory,store,store-cold,memcached,processing]

Every cell runs its own imgserver (this checkout, as a subprocess on
127.0.0.1) configured so that only the tier measured can answer:

- ``memory``: the in-memory result cache (``--cache-mb 256``, no tier);
- ``store``: the result store (``--cache-mb 0 --result-dir DIR``), page cache warm;
- ``store-cold``: the same store after a restart of the server with the
  store's files evicted from the page cache (``POSIX_FADV_DONTNEED``), each
  transform asked once: what a restart or another worker costs;
- ``memcached``: memcached only (``--cache-mb 0 --memcached HOST:PORT``; a
  memcached is started on a free port unless ``--memcached`` is given);
- ``processing``: nothing kept (``--cache-mb 0``, no tier), for comparison.

The requests are distinct transforms (every corpus JPEG at ``--widths``
sizes, 256x256, 257x257..., crop, JPEG q80).  Each tier cell first asks for
every transform once (processed, then offered to the tier), then again until
a whole pass is answered without processing (bounded): the tier holds them
all.  Then a closed-loop client (``--connections`` keep-alive connections,
asyncio, one thread) asks for them in turn for ``--seconds``.  The server's
own counters (``/metrics``, summed over workers) check where the answers
came from: no image processed and no memory-cache hit in a tier cell, and
the tier's hits where the server exports them (``n/a`` otherwise).
``--processes N`` runs every cell's server with N worker processes (the
store is shared by them; each has a memory cache of its own, filled through
new connections until every worker holds every transform).  The latencies
include the client's own time (an asyncio loop in Python: tens of
microseconds) and are measured on the same machine as the server.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any, Sequence
from urllib.parse import quote

import _common  # noqa: F401  (puts the project on sys.path)
import _load
import _servers
from _common import table
from pipeline import corpus_files
from server_burst import (Sample, metric_sum, percentile, processes_args, parse_processes, scrape,
                          settled_scrape, start_server)

CELLS = ("memory", "store", "store-cold", "memcached", "processing")
TIER_OF = {"memory": None, "store": "store", "store-cold": "store", "memcached": "memcached", "processing": None}
QUERY = "w={w}&h={w}&fit=crop&fm=jpg&q=80"


# -- memcached ---------------------------------------------------------------------

def start_memcached(log_dir: str, memory_mb: int = 256, timeout: float = 10.0) -> tuple[_servers.Proc, str]:
    """``/usr/bin/memcached`` on a free port of 127.0.0.1 (``-u nobody`` as root); (proc, "HOST:PORT")."""
    binary = shutil.which("memcached") or "/usr/bin/memcached"
    if not os.path.exists(binary):
        raise RuntimeError("memcached not found (Debian: apt-get install memcached); or pass --memcached")
    port = _servers.free_port()
    argv = [binary, "-l", _servers.HOST, "-p", str(port), "-U", "0", "-m", str(memory_mb), "-I", "1m"]
    if os.geteuid() == 0:
        argv += ["-u", "nobody"]
    proc = _servers.Proc("memcached", argv, log=os.path.join(log_dir, "memcached.log"))
    deadline = time.monotonic() + timeout
    while True:
        try:
            if memcached_version(_servers.HOST, port):
                return proc, f"{_servers.HOST}:{port}"
        except OSError:
            pass
        if not proc.alive() or time.monotonic() > deadline:
            proc.stop()
            raise RuntimeError(f"memcached did not start:\n{proc.tail()}")
        time.sleep(0.05)


def memcached_version(host: str, port: int) -> str:
    """memcached's ``version`` answer ("" if none)."""
    with socket.create_connection((host, port), timeout=2.0) as s:
        s.sendall(b"version\r\n")
        answer = s.recv(256)
    return answer.decode("ascii", "replace").strip() if answer.startswith(b"VERSION") else ""


def memcached_stats(address: str) -> dict[str, str]:
    """memcached's ``stats`` (curr_items, bytes, get_hits...); {} if it does not answer."""
    host, _, port = address.rpartition(":")
    out: dict[str, str] = {}
    try:
        with socket.create_connection((host, int(port)), timeout=2.0) as s:
            s.sendall(b"stats\r\n")
            data = b""
            while not data.endswith(b"END\r\n"):
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
    except OSError:
        return out
    for line in data.decode("ascii", "replace").splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0] == "STAT":
            out[parts[1]] = parts[2]
    return out


# -- the store on disk -----------------------------------------------------------------

def store_files(directory: str) -> list[str]:
    """The regular files under the store's directory."""
    out: list[str] = []
    for dirpath, _, files in os.walk(directory):
        out.extend(os.path.join(dirpath, f) for f in files)
    return out


def evict(paths: Sequence[str]) -> int:
    """Drop the files' pages from the page cache (``POSIX_FADV_DONTNEED``); bytes concerned."""
    total = 0
    for path in paths:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            total += os.fstat(fd).st_size
        finally:
            os.close(fd)
    return total


def file_system(path: str) -> str:
    """The file system type under ``path`` (from /proc/mounts), e.g. "ext4"."""
    path = os.path.realpath(path)
    best, kind = "", "?"
    try:
        with open("/proc/mounts") as f:
            for line in f:
                fields = line.split()
                if len(fields) >= 3:
                    mount = fields[1].replace("\\040", " ")
                    if (path == mount or path.startswith(mount.rstrip("/") + "/")) and len(mount) >= len(best):
                        best, kind = mount, fields[2]
    except OSError:
        pass
    return kind


# -- the server's counters ---------------------------------------------------------------

def tier_hits(samples: Sequence[Sample] | None, tier: str) -> float | None:
    """The server's count of answers from ``tier``, however it exports it: a ``*hit*``
    counter labelled ``tier="<tier>"`` (e.g. ``imgserver_tier_hits_total``) or named after
    it (``imgserver_store_hits_total``); None when the server exports nothing of the kind."""
    exact = [v for n, lab, v in samples or () if n == "imgserver_tier_hits_total" and lab.get("tier") == tier]
    if exact:
        return sum(exact)
    found = None
    for name, labels, value in samples or ():
        if "hit" not in name or name.endswith("_created"):
            continue
        if labels.get("tier") == tier or f"_{tier}_" in name:
            found = (found or 0.0) + value
    return found


def snapshot(samples: Sequence[Sample] | None, tier: str | None) -> dict[str, float | None]:
    return {
        "ok": metric_sum(samples, "imgserver_requests_total", endpoint="images", status="200"),
        "processed": metric_sum(samples, "imgserver_processing_seconds_count"),
        "memory_hits": metric_sum(samples, "imgserver_cache_hits_total"),
        "coalesced": metric_sum(samples, "imgserver_coalesced_total"),
        "tier_hits": tier_hits(samples, tier) if tier else None,
    }


def delta(after: dict[str, float | None], before: dict[str, float | None]) -> dict[str, float | None]:
    return {k: None if after[k] is None or before[k] is None else after[k] - before[k]  # type: ignore[operator]
            for k in after}


# -- one cell ------------------------------------------------------------------------------

def sequential(port: int, paths: Sequence[str], timeout: float = 60.0,
               fresh: bool = False) -> list[tuple[str, float]]:
    """Each path once on one keep-alive connection (``fresh``: a new connection each, so
    that the requests spread over a server's worker processes): (status, seconds) per request."""
    import http.client

    out = []
    conn = http.client.HTTPConnection(_servers.HOST, port, timeout=timeout)
    try:
        for path in paths:
            t0 = time.perf_counter()
            try:
                conn.request("GET", path)
                response = conn.getresponse()
                response.read()
                status = str(response.status)
            except (OSError, http.client.HTTPException) as e:
                status = f"error: {type(e).__name__}"
                fresh = True
            if fresh:
                conn.close()
                conn = http.client.HTTPConnection(_servers.HOST, port, timeout=timeout)
            out.append((status, time.perf_counter() - t0))
    finally:
        conn.close()
    return out


def fill(port: int, paths: Sequence[str], processes: int, tier: str | None) -> tuple[int, int]:
    """Ask for every path until a whole pass is answered without processing (the tier, or
    every worker's memory cache, holds them all); (passes made, processed in the last pass).
    With several processes each request goes on a new connection, to reach every worker."""
    processed = -1
    passes = 6 if processes == 1 else 6 + 2 * processes
    for n in range(1, passes + 1):
        before = snapshot(settled_scrape(port, processes), tier)
        answers = sequential(port, paths, fresh=processes > 1)
        bad = [s for s, _ in answers if s != "200"]
        if bad:
            raise RuntimeError(f"{len(bad)} answers were not 200 while filling: {sorted(set(bad))}")
        time.sleep(0.3)  # a put is fire-and-forget: let the last ones land
        processed = round(delta(snapshot(settled_scrape(port, processes), tier), before)["processed"] or 0)
        if n > 1 and processed == 0:
            return n, 0
    return passes, processed


def run_cell(cell: str, args: argparse.Namespace, root: str, paths: Sequence[str], processes: int,
             memcached: str | None, work: str) -> list[Any]:
    """Start the cell's server, fill its tier, measure; one table row."""
    tier = TIER_OF[cell]
    store_dir = os.path.join(args.result_dir or work, f"store-{cell.split('-')[0]}")
    options: list[str] = []
    cache_mb: float = 0
    if cell == "memory":
        cache_mb = 256
    elif tier == "store":
        options = ["--result-dir", store_dir, "--result-dir-max-mb", "1024"]
    elif tier == "memcached":
        options = ["--memcached", memcached or ""]
    server, port = start_server(root, processes, workers=args.workers, max_queue=1000, cache_mb=cache_mb,
                                extra=options, log_dir=work)
    try:
        fills = ""
        if cell != "processing":
            made, left = fill(port, paths, processes, tier)
            fills = f"{made} passes" + (f", {left} still processed in the last" if left else "")
        if cell == "store-cold":
            # A restart, and the store's files out of the page cache: the first read of each from the disk.
            server.stop()
            evicted = evict(store_files(store_dir))
            server, port = start_server(root, processes, workers=args.workers, max_queue=1000, cache_mb=0,
                                        extra=options, log_dir=work)
            before = snapshot(settled_scrape(port, processes), tier)
            answers = sequential(port, paths)
            after = snapshot(settled_scrape(port, processes), tier)
            lat = sorted(sec for st, sec in answers if st == "200")
            ok = len(lat)
            others = len(answers) - ok
            rate = ok / sum(sec for _, sec in answers) if answers else 0.0
            fills += f"; restarted, {evicted / 2**20:.1f} MiB evicted, each asked once"
        else:
            before = snapshot(settled_scrape(port, processes), tier)
            res = _load.closed_loop(port, paths, connections=args.connections, warmup=args.warmup,
                                    seconds=args.seconds)
            after = snapshot(settled_scrape(port, processes), tier)
            lat = res.latencies()
            ok = sum(1 for _, _, st in res.samples if st == "200")
            others = sum(1 for _, _, st in res.samples if st != "200")
            rate = res.rate
        d = delta(after, before)

        def ms(v: float) -> str:
            return f"{v * 1000:,.2f}"

        checks = []
        if round(d["ok"] or 0) != ok:
            checks.append(f"server counted {d['ok']:.0f} answers")
        if cell != "processing" and d["processed"]:
            checks.append(f"{d['processed']:.0f} PROCESSED")
        if cell != "memory" and d["memory_hits"]:
            checks.append(f"{d['memory_hits']:.0f} memory hits")
        if cell == "memory" and round(d["memory_hits"] or 0) != ok:
            checks.append(f"{d['memory_hits']:.0f} memory hits")
        if d["tier_hits"] is not None and round(d["tier_hits"]) != ok:
            checks.append(f"{d['tier_hits']:.0f} tier hits for {ok} answers")
        if d["coalesced"]:
            checks.append(f"{d['coalesced']:.0f} shared")
        if others:
            checks.append(f"{others} not 200")
        hits = "-" if tier is None else "n/a" if d["tier_hits"] is None else f"{d['tier_hits']:.0f}"
        verdict = "ok" if not checks else "; ".join(checks)
        shown = {"store": "--result-dir DIR", "memcached": "--memcached HOST:PORT"}.get(tier or "", "")
        return [cell, " ".join(processes_args(processes) + [f"--cache-mb {cache_mb:g}", shown]).strip(), ok,
                f"{rate:,.0f}", ms(percentile(lat, 50)), ms(percentile(lat, 90)), ms(percentile(lat, 99)),
                ms(max(lat)) if lat else "-", f"{d['processed'] or 0:.0f}", hits, verdict, fills]
    finally:
        server.stop()


# -- main --------------------------------------------------------------------------------

def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("corpus", help="directory of images (its JPEGs; --all-formats: PNG and WebP too)")
    parser.add_argument("--seconds", type=float, default=3.0, help="measured seconds per cell (default 3)")
    parser.add_argument("--warmup", type=float, default=0.5, help="unmeasured load first, per cell (default 0.5)")
    parser.add_argument("--connections", type=int, default=1, help="keep-alive connections (default 1)")
    parser.add_argument("--widths", type=int, default=2, help="transforms per image: 256, 257... (default 2)")
    parser.add_argument("--images", type=int, default=0, help="use only this many images (default: all)")
    parser.add_argument("--all-formats", action="store_true", help="the corpus PNGs and WebPs too")
    parser.add_argument("--workers", type=int, default=2, help="server --workers (default 2)")
    parser.add_argument("--processes", default="1", help="server processes (default 1: no parent)")
    parser.add_argument("--memcached", help="an existing memcached HOST:PORT (default: start one)")
    parser.add_argument("--result-dir", help="where the stores go (default: a temporary directory)")
    parser.add_argument("--cells", default=",".join(CELLS), help=f"cells to run (default {','.join(CELLS)})")
    args = parser.parse_args(argv)
    _servers.install_cleanup()
    try:
        processes = parse_processes(args.processes)
    except ValueError as e:
        parser.error(str(e))
    if len(processes) != 1:
        parser.error("--processes: one number")
    cells = [c.strip() for c in args.cells.split(",") if c.strip()]
    unknown = [c for c in cells if c not in CELLS]
    if unknown or not cells:
        parser.error(f"--cells: unknown {unknown}; choose among {', '.join(CELLS)}")
    corpus = os.path.abspath(args.corpus)
    kinds = (".jpg", ".jpeg", ".png", ".webp") if args.all_formats else (".jpg", ".jpeg")
    images = corpus_files(corpus, kinds)
    if args.images > 0:
        images = images[:args.images]
    if not images:
        parser.error(f"no images in {corpus}")
    names = [quote(os.path.relpath(p, corpus)) for p in images]
    paths = [f"/images/{n}?{QUERY.format(w=256 + i)}" for i in range(max(1, args.widths)) for n in names]
    if len(paths) < 2 * args.connections:
        print(f"warning: {len(paths)} transforms for {args.connections} connections: identical requests "
              "in flight will share one answer", file=sys.stderr)

    work = tempfile.mkdtemp(prefix="bench-tiers-")
    memcached_proc = None
    memcached = args.memcached
    try:
        if "memcached" in cells and not memcached:
            memcached_proc, memcached = start_memcached(work)
        version = ""
        if memcached:
            host, _, port = memcached.rpartition(":")
            try:
                version = memcached_version(host, int(port))
            except (OSError, ValueError):
                version = "not answering"
        store_home = args.result_dir or work
        print(f"{len(images)} corpus images x {args.widths} sizes = {len(paths)} distinct transforms "
              f"({QUERY.format(w='256..')}); {os.cpu_count()} CPUs; load average {_servers.load_average()}")
        print(f"server: imgserver (this checkout) {' '.join(processes_args(processes[0]) + [''])}"
              f"--workers {args.workers} --quiet; store under {store_home} ({file_system(store_home)})"
              + (f"; memcached {memcached} ({version})" if memcached else ""))
        print(f"client: asyncio closed loop, {args.connections} keep-alive connection(s), "
              f"{args.warmup:g} s warm-up + {args.seconds:g} s per cell (store-cold: one sequential pass)\n")
        rows = []
        for cell in cells:
            rows.append(run_cell(cell, args, corpus, paths, processes[0], memcached, work))
        print(table(["answered from", "server options", "answers", "req/s", "p50 ms", "p90 ms", "p99 ms",
                     "max ms", "processed", "tier hits", "check (server counters)", "filled in"], rows))
        notes = []
        for cell in ("store", "store-cold"):
            d = os.path.join(store_home, f"store-{cell.split('-')[0]}")
            if cell in cells and os.path.isdir(d):
                files = store_files(d)
                notes.append(f"store: {len(files)} files, {sum(os.path.getsize(f) for f in files) / 2**20:.1f} MiB")
                break
        if memcached:
            st = memcached_stats(memcached)
            if st:
                notes.append(f"memcached: {st.get('curr_items')} items, {int(st.get('bytes', 0)) / 2**20:.1f} MiB, "
                             f"{st.get('get_hits')} get hits, {st.get('get_misses')} misses")
        print("\n" + "; ".join(notes) if notes else "")
        print("processed: images the server processed during the measurement (0 in every cell but "
              "'processing'); tier hits: the server's own count of answers from the tier (n/a: not exported); "
              "check: the server's counters agree that every answer came from the cell's tier.")
        print(f"load average after: {_servers.load_average()}")
        failed = any(r[10] != "ok" for r in rows)
        if failed:
            print("WARNING: some answers did not come from the tier measured (see check)")
        return 1 if failed else 0
    finally:
        if memcached_proc is not None:
            memcached_proc.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    _servers.run_main(main)
