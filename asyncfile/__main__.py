"""``python -m asyncfile [PATH ...]``: load files without blocking the reactor and say how it went.

With no paths it loads the image server's built-in samples (or, without
them, asyncfile's own sources).  Prints one line per file, then the
loader's stats and the worst reactor stall seen meanwhile.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

from twisted.internet import defer, task

from . import FileLoader


def _default_paths() -> list[str]:
    here = os.path.dirname(os.path.abspath(__file__))
    samples = os.path.join(os.path.dirname(here), "imgserver", "samples")
    return [samples] if os.path.isdir(samples) else [here]


def _expand(paths: list[str]) -> list[str]:
    files: list[str] = []
    for p in paths:
        if os.path.isdir(p):
            for root, dirs, names in os.walk(p):
                dirs[:] = sorted(d for d in dirs if not d.startswith((".", "__")))
                files.extend(os.path.join(root, n) for n in sorted(names) if not n.startswith("."))
        else:
            files.append(p)
    return files


async def _main(reactor: Any, args: argparse.Namespace) -> None:
    loader = FileLoader(reactor, max_open=args.max_open, engine=args.engine)
    files = _expand(args.paths or _default_paths())
    worst = [0.0]
    last = [time.perf_counter()]

    def tick() -> None:
        now = time.perf_counter()
        worst[0] = max(worst[0], now - last[0] - 0.001)
        last[0] = now

    probe = task.LoopingCall(tick)
    probe.start(0.001)
    started = time.perf_counter()

    async def one(path: str) -> None:
        try:
            data = await loader.load(path)
        except OSError as e:
            print(f"  {path}: {type(e).__name__}: {e.strerror}")
        else:
            print(f"  {path}: {len(data):,} bytes")

    await defer.gatherResults([defer.ensureDeferred(one(p)) for p in files])
    elapsed = time.perf_counter() - started
    probe.stop()
    stats = loader.stats()
    loader.close()
    print(f"\nloaded {stats['loaded']} of {len(files)} files, {stats['bytes']:,} bytes in {elapsed * 1000:.1f} ms "
          f"with the {stats['engine']} engine")
    print(f"reads: {stats['inline_reads']} inline (page cache, no thread), {stats['pool_reads']} in the I/O pool; "
          f"opens: {stats['inline_opens']} inline, {stats['pool_opens']} in the pool")
    print(f"peak open descriptors: {stats['peak_open']} (max {stats['max_open']}); "
          f"worst reactor stall: {worst[0] * 1000:.1f} ms")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m asyncfile", description=__doc__.split("\n")[0])
    parser.add_argument("paths", nargs="*", help="files or directories (default: built-in samples)")
    parser.add_argument("--engine", default="auto")
    parser.add_argument("--max-open", type=int, default=64)
    args = parser.parse_args(argv)
    task.react(lambda reactor: defer.ensureDeferred(_main(reactor, args)))


if __name__ == "__main__":
    main(sys.argv[1:])
