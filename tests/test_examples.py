"""Run every ``examples/*.py`` as a program and check what it prints.

Each example found by glob (files starting with ``_`` are helpers and are
skipped) runs as ``python examples/NAME.py`` with the repository root as the
working directory and on ``PYTHONPATH``, under a 60 s timeout.  It must exit 0
and print no traceback on stderr.  That is all an example without an entry in
``EXPECTATIONS`` has to do, so a new example is tested the moment it exists.

To check an example's output, add an entry keyed by its file name::

    EXPECTATIONS["file_reader.py"] = Expect(
        stdout=(r"^read \\d+ files", r"^reactor stalls: max [\\d.]+ ms$"),
        args=("--files", "200"),
        checks=(my_check,),  # my_check(result) -> None, asserts on numbers
    )

``stdout`` holds regular expressions (``re.MULTILINE``: ``^``/``$`` match at
line ends), each of which must match somewhere in stdout.  ``checks`` are
functions for what a pattern cannot say (compare numbers, count lines).  They
get the finished ``Run`` and raise ``AssertionError``.  Keep the patterns to
stable key lines, not timings.
"""

from __future__ import annotations

import ast
import os
import re
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
EXAMPLES_DIR = REPO_ROOT / "examples"
TIMEOUT_S = 60


@dataclass(frozen=True)
class Run:
    name: str
    returncode: int
    stdout: str
    stderr: str

    def describe(self) -> str:
        return (
            f"examples/{self.name} exited {self.returncode}\n"
            f"--- stdout ---\n{self.stdout[-6000:]}\n"
            f"--- stderr ---\n{self.stderr[-6000:]}"
        )


@dataclass(frozen=True)
class Expect:
    """What one example must print.  Every field has a default."""

    stdout: tuple[str, ...] = ()  # regexes, each must match somewhere in stdout
    args: tuple[str, ...] = ()  # extra command-line arguments
    checks: tuple[Callable[[Run], None], ...] = ()  # extra assertions
    exit_code: int = 0
    stderr_clean: bool = True  # no traceback / unhandled error on stderr


def ints(pattern: str, text: str) -> list[tuple[int, ...]]:
    """All matches of ``pattern`` in ``text``, each as a tuple of its int groups."""
    return [
        tuple(int(g) for g in m.groups())
        for m in re.finditer(pattern, text, re.MULTILINE)
    ]


# --- pb_semaphore_queue.py -------------------------------------------------


def _pb_limits_held(run: Run) -> None:
    peaks = ints(r"^peak concurrency inside the server: (\d+) \(limit (\d+)\)", run.stdout)
    assert len(peaks) == 3, f"expected one line per round, got {peaks}"
    for peak, limit in peaks:
        assert 1 <= peak <= limit


def _pb_refusals_add_up(run: Run) -> None:
    rounds = ints(
        r"^calls: (\d+) sent, (\d+) answered, (\d+) refused with Busy, "
        r"(\d+) other errors, (\d+) wrong results$",
        run.stdout,
    )
    assert len(rounds) == 3, rounds
    (sent1, answered1, refused1, _, _), *bounded = rounds
    assert answered1 == sent1 and refused1 == 0, "the plain semaphore answers all"
    for sent, answered, refused, other, wrong in bounded:
        assert answered + refused == sent and other == wrong == 0
        assert refused > 0, "a burst of 300 over a bound of 50 must see refusals"


def _pb_waiters(run: Run) -> None:
    ((unbounded,),) = ints(r"^peak waiters, len\(sem\.waiting\): (\d+) \(no bound\)", run.stdout)
    bounded = ints(r"^peak waiters, len\(sem\.waiting\): (\d+) \(bound (\d+)\)", run.stdout)
    assert len(bounded) == 2
    for peak, bound in bounded:
        assert peak <= bound < unbounded, "the unbounded queue must grow past the bound"


# --- deferred_queue_workers.py ---------------------------------------------


def _queue_totals(run: Run) -> None:
    ((produced, accepted, refused, _in_pause),) = ints(
        r"^jobs: (\d+) produced, (\d+) accepted, (\d+) refused with QueueOverflow "
        r"\((\d+) of them",
        run.stdout,
    )
    assert accepted + refused == produced
    assert refused > 0, "the first burst alone overflows the queue"
    ((done, accepted2),) = ints(r"^jobs done: (\d+) of (\d+) accepted", run.stdout)
    assert done == accepted2 == accepted


def _queue_paused_rows_idle(run: Run) -> None:
    rows = [
        line.split()
        for line in run.stdout.splitlines()
        if re.match(r"^\s+\d+\s+\d+\s+\d+\s+\d+\s+\d+\s+\d+\s+PAUSED$", line)
    ]
    assert rows, "the timeline must show the paused period"
    for _t, _accepted, _refused, started, done, _queued, _state in rows:
        assert started == done == "0", f"work happened while paused: {rows}"


# --- light_heavy_split.py --------------------------------------------------

_LHS_HEAVY = r"^heavy: (\d+) requests, (\d+) OK, (\d+) wrong, (\d+) failed; "
_LHS_LIGHT = r"^light: (\d+) pings, (\d+) answered, (\d+) wrong; "
_LHS_POOL = r"^thread pool: (\d+) threads, (\d+) jobs, at most (\d+) busy and (\d+) queued"
_LHS_LOADER = (
    r"^loader: engine \w+, (\d+) loaded, (\d+) errors; reads (\d+) inline / (\d+) in the pool; "
    r"opens (\d+) inline / (\d+) in the pool; (\d+) EAGAIN fallbacks; peak open (\d+) "
    r"\(max_open (\d+)\), peak waiting (\d+) \(max_waiting (\d+)\)$"
)


def _lhs_all_answered(run: Run, heavy: int, phases: int) -> None:
    rows = ints(_LHS_HEAVY, run.stdout)
    assert len(rows) == phases, rows
    for sent, ok, wrong, failed in rows:
        assert sent == ok == heavy and wrong == failed == 0
    pings = ints(_LHS_LIGHT, run.stdout)
    assert len(pings) == phases + 1, "a baseline plus one line per variant"
    for sent, answered, wrong in pings:
        assert sent == answered > 0 and wrong == 0


def _lhs_bounds(run: Run, heavy: int, phases: int) -> None:
    pools = ints(_LHS_POOL, run.stdout)
    assert len(pools) == phases // 2, pools
    for threads, jobs, busy, _queued in pools:
        assert jobs == heavy and 1 <= busy <= threads
    loaders = ints(_LHS_LOADER, run.stdout)
    assert len(loaders) == phases // 2, loaders
    for loaded, errors, r_in, r_pool, o_in, o_pool, _, peak, max_open, waiting, max_waiting in loaders:
        assert loaded == heavy and errors == 0
        assert r_in + r_pool >= loaded and o_in + o_pool == loaded
        assert 1 <= peak <= max_open and waiting <= max_waiting


def _lhs_default_run(run: Run) -> None:
    _lhs_all_answered(run, 200, 2)
    _lhs_bounds(run, 200, 2)


# --- file_reader.py --------------------------------------------------------

_FR_BY_HAND = re.compile(
    r"^(\S+) +(\d+) B +(\d+) chunks \((\d+) data \+ EOF\): (.+?) +-> \w+ \d+x\d+ \w+ in [\d.]+ ms$",
    re.MULTILINE,
)
_FR_LOADED = re.compile(r"^(\S+) +(\d+) B  -> \w+ \d+x\d+ \w+ in [\d.]+ ms$", re.MULTILINE)


def _fr_reads_add_up(run: Run) -> None:
    ((count,),) = ints(r"^images: (\d+) ", run.stdout)
    by_hand = _FR_BY_HAND.findall(run.stdout)
    assert len(by_hand) == count >= 1, by_hand
    total_chunks = 0
    for _name, size, chunks, data, trail in by_hand:
        size, chunks, data = int(size), int(chunks), int(data)
        assert data == -(-size // (16 * 1024)) and chunks == data + 1, "one chunk per 16 KiB, then EOF"
        steps = [int(n) for n in re.findall(r" x(\d+)", trail)]
        assert sum(steps) == chunks, f"the trail {trail!r} must account for every chunk"
        total_chunks += chunks
    ((inline, pool, _eagain, registered, readers),) = ints(
        r"^engine: reads (\d+) inline / (\d+) in the pool, (\d+) EAGAIN fallbacks; "
        r"readers found in reactor.getReaders\(\) by their doRead: (\d+) of (\d+)$",
        run.stdout,
    )
    assert inline + pool == total_chunks and readers == count
    loaded = _FR_LOADED.findall(run.stdout)
    assert sorted(loaded) == sorted((name, size) for name, size, *_ in by_hand)


def _fr_decodes_bounded(run: Run) -> None:
    ((started, peak, limit, threads),) = ints(
        r"^decodes: (\d+) run, peak in flight (\d+) \(limit (\d+), (\d+) pool threads\) OK$",
        run.stdout,
    )
    ((count,),) = ints(r"^images: (\d+) ", run.stdout)
    assert started == 2 * count and 1 <= peak <= limit < threads
    ((active, _waiting, in_reactor),) = ints(
        r"^limiter: peak active (\d+), peak waiting (\d+); decodes run in the reactor thread: (\d+)$",
        run.stdout,
    )
    assert active <= limit and in_reactor == 0


_FR_STDOUT = (
    r"^  epoll.register\(fd\): refused with EPERM; Twisted then polls it in every reactor iteration$",
    r"^  select\(\), at end of file: readable$",
    r"^== part 1: by hand, engine.open -> FileReader\(\.\.\.\)\.start\(inline_steps=0\), "
    r"engine \w+, 16 KiB chunks ==$",
    r"^== part 2: the one-liner, FileLoader\(chunk_size=16 KiB\)\.load\(path\)\.addCallback\(decode\) ==$",
    r"^loader: \d+ loaded, 0 errors; reads \d+ inline / \d+ in the pool; peak open \d+ \(max_open 64\)$",
    r"^descriptors still open: 0$",
    r"^reactor stall: worst [\d.]+ ms over [\d.]+ s \(1 ms LoopingCall probe\): "
    r"[\d.]+ ms while no decode ran, [\d.]+ ms while one did$",
)


EXPECTATIONS: dict[str, Expect] = {
    "pb_semaphore_queue.py": Expect(
        stdout=(
            r"^== Round 1: DeferredSemaphore\(10\), no bound on waiters ==$",
            r"^queueing delay ms in the server, \d+ accepted calls: min [\d.]+ / "
            r"median [\d.]+ / p90 [\d.]+ / max [\d.]+$",
            r"^client latency ms, Busy: +min [\d.]+",
            r"^total time: [\d.]+ s for \d+ answers",
            r"^Trade-off:$",
        ),
        checks=(_pb_limits_held, _pb_refusals_add_up, _pb_waiters),
    ),
    "deferred_queue_workers.py": Expect(
        stdout=(
            r"^\s+t ms\s+accepted\s+refused\s+started\s+done\s+in queue\s+workers$",
            r"pause\(\) at \d+ ms$",
            r"resume\(\) at \d+ ms$",
            r"^pause: 4 worker tasks paused for [\d.]+ ms; while paused "
            r"0 jobs started and 0 completed \(OK\)$",
            r"^time in queue ms: min [\d.]+ / median [\d.]+ / max [\d.]+; "
            r"most jobs queued at once: \d+ \(size 20\)$",
            r"^total time: [\d.]+ s$",
        ),
        checks=(_queue_totals, _queue_paused_rows_idle),
    ),
    "image_client.py": Expect(
        stdout=(
            r"^  200 /images/photo\.jpg\?w=256&h=256&fit=crop +[\d.]+ ms  JPEG 256x256, ",
            r"^  200 /images/logo\.png\?w=128&fm=jpg +[\d.]+ ms  JPEG 128x128, ",
            r"^  404 /images/missing\.jpg\?w=10 +\{\"error\":\"not_found\"",
            r"^  thumbnail\('photo\.jpg', 1600, None, 'clip'\) +[\d.]+ ms  JPEG 1600x1067, ",
            r"^  thumbnail\('missing\.jpg'\) raised NotFound: ",
            r"^server: \d+ images processed, cache \d+ hits / \d+ misses, 0 refused$",
        ),
    ),
    "light_heavy_split.py": Expect(
        stdout=(
            r"^300 files of 16-256 KiB \([\d.]+ MiB\) written to a temp dir and read once",
            r"^== baseline: pings only, no heavy requests ==$",
            r"^== \(a\) deferToThreadPool, dedicated ThreadPool\(16\) doing open\(\)\+read\(\) ==$",
            r"^== \(b\) FileLoader\(max_open=64, io_threads=16\)\.load ==$",
            r"^light: \d+ pings, .*; latency ms p50 [\d.]+ / p99 [\d.]+ / max [\d.]+$",
            r"^reactor stall: worst [\d.]+ ms over [\d.]+ s \(1 ms LoopingCall probe\)$",
            r"^slow storage: not run \(pass --slow",
            r"^== summary ==$",
            r"^\(b\) FileLoader +\d+ +[\d.]+ +[\d.]+ +[\d.]+ +[\d.]+$",
        ),
        checks=(_lhs_default_run,),
    ),
    "file_reader.py": Expect(
        stdout=(
            r"^images: \d+ (built-in sample images from imgserver/samples/"
            r"|images generated with Pillow in a temp dir)",
            *_FR_STDOUT,
        ),
        checks=(_fr_reads_add_up, _fr_decodes_bounded),
    ),
}


def discover() -> list[str]:
    return sorted(
        p.name for p in EXAMPLES_DIR.glob("*.py") if not p.name.startswith("_")
    )


def run_example(name: str, args: tuple[str, ...] = ()) -> Run:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(REPO_ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    )
    env["PYTHONUNBUFFERED"] = "1"  # keep the output of an example that hangs
    proc = subprocess.Popen(
        [sys.executable, str(EXAMPLES_DIR / name), *args],
        cwd=REPO_ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # Its own process group, so a timeout also ends any child it started.
        start_new_session=(os.name == "posix"),
    )
    try:
        out, err = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        if os.name == "posix":
            os.killpg(proc.pid, signal.SIGKILL)
        else:
            proc.kill()
        out, err = proc.communicate()
        pytest.fail(
            f"timed out after {TIMEOUT_S} s\n"
            + Run(name, proc.returncode, out, err).describe()
        )
    return Run(name, proc.returncode, out, err)


def check_run(name: str, expect: Expect) -> None:
    """Run ``examples/NAME`` with ``expect.args`` and check it against ``expect``."""
    run = run_example(name, expect.args)

    assert run.returncode == expect.exit_code, run.describe()
    if expect.stderr_clean:
        for marker in ("Traceback (most recent call last)", "Unhandled error"):
            assert marker not in run.stderr, f"{marker!r} on stderr\n{run.describe()}"
    for pattern in expect.stdout:
        assert re.search(pattern, run.stdout, re.MULTILINE), (
            f"no line matches {pattern!r}\n{run.describe()}"
        )
    for check in expect.checks:
        try:
            check(run)
        except AssertionError as e:
            raise AssertionError(f"{check.__name__}: {e}\n{run.describe()}") from e


@pytest.mark.parametrize("name", discover())
def test_example_runs(name: str) -> None:
    check_run(name, EXPECTATIONS.get(name, Expect()))


@pytest.mark.parametrize("name", discover())
def test_example_has_header_docstring(name: str) -> None:
    source = (EXAMPLES_DIR / name).read_text(encoding="utf-8")
    doc = ast.get_docstring(ast.parse(source, filename=name))
    assert doc and len(doc.splitlines()) >= 3, (
        f"examples/{name} must start with a docstring saying what it shows, "
        f"why, and when to choose it"
    )


def test_expectations_name_existing_examples() -> None:
    stale = sorted(set(EXPECTATIONS) - set(discover()))
    assert not stale, f"EXPECTATIONS entries without an example file: {stale}"


def _lhs_slow_run(run: Run) -> None:
    _lhs_all_answered(run, 64, 4)
    _lhs_bounds(run, 64, 4)
    *_, slow = ints(_LHS_LOADER, run.stdout)
    loaded, _, r_in, r_pool, o_in, o_pool = slow[:6]
    assert r_in == o_in == 0 and r_pool >= loaded and o_pool == loaded, slow
    reads = [float(m) for m in re.findall(
        r"^SlowFS: \d+ read calls reached the daemon, ([\d.]+) per request$",
        run.stdout, re.MULTILINE)]
    assert len(reads) == 2 and all(r >= 1 for r in reads), reads


def test_light_heavy_split_on_slowfs() -> None:
    """``--slow``: both variants again behind a FUSE mount, where every read
    and open of the loader goes to its pool."""
    from asyncfile.testing.slowfs import fuse_unavailable_reason

    reason = fuse_unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    check_run("light_heavy_split.py", Expect(
        args=("--slow", "--heavy", "64", "--files", "64"),
        stdout=(r"^slow storage: the same files behind SlowFS",),
        checks=(_lhs_slow_run,),
    ))


def test_file_reader_generated_images() -> None:
    """``--generate``: the images Pillow draws when imgserver/samples/ has none
    (the default run uses the samples once they exist)."""
    check_run("file_reader.py", Expect(
        args=("--generate",),
        stdout=(r"^images: 4 images generated with Pillow in a temp dir \(--generate\)$", *_FR_STDOUT),
        checks=(_fr_reads_add_up, _fr_decodes_bounded),
    ))
