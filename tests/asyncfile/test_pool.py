"""IOPool (asyncfile.pool): threads on demand, cancellation, stop, fork.

Jobs that must block wait on a ``Gate`` (a threading.Event the test sets);
the reactor learns that a job runs through a Deferred fired with
``callFromThread``.  Programs that stop their reactor or fork run in
subprocesses: pytest-twisted's reactor runs in this one.
"""

from __future__ import annotations

import errno
import json
import operator
import os
import subprocess
import sys
import textwrap
import threading
import time
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer
from twisted.python.failure import Failure

from asyncfile.pool import IOPool, PoolForked

pytestmark = pytest.mark.timeout(60)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
JOB_TIMEOUT = 20.0  # a gate nobody releases fails its job instead of holding a thread


def _reactor() -> Any:
    from twisted.internet import reactor

    return reactor


def within(d: defer.Deferred[Any], seconds: float = 5.0) -> defer.Deferred[Any]:
    """``d``, failing with TimeoutError if it has not fired in ``seconds``."""
    return d.addTimeout(seconds, _reactor())


async def outcome(d: defer.Deferred[Any], seconds: float = 5.0) -> tuple[str, Any]:
    """("ok", value) or ("failed", Failure), without raising (some of the
    exceptions tested here are KeyboardInterrupt and SystemExit)."""
    return await within(d.addCallbacks(lambda v: ("ok", v), lambda f: ("failed", f)), seconds)


class Gate:
    """A job that blocks until released, and tells the reactor when it runs."""

    def __init__(self, value: Any = None) -> None:
        self.value = value
        self.event = threading.Event()
        self.started: defer.Deferred[str] = defer.Deferred()
        self.thread_name: str | None = None

    def __call__(self) -> Any:
        self.thread_name = threading.current_thread().name
        _reactor().callFromThread(self.started.callback, self.thread_name)
        if not self.event.wait(JOB_TIMEOUT):
            raise TimeoutError("gate never released")
        return self.value

    def release(self) -> None:
        self.event.set()


class Pools:
    """Makes pools and gates; releases every gate and stops every pool after the test."""

    def __init__(self) -> None:
        self.pools: list[IOPool] = []
        self.gates: list[Gate] = []

    def pool(self, max_threads: int = 16, **kwargs: Any) -> IOPool:
        pool = IOPool(_reactor(), max_threads, name=f"test-io{len(self.pools)}", **kwargs)
        self.pools.append(pool)
        return pool

    def gate(self, value: Any = None) -> Gate:
        gate = Gate(value)
        self.gates.append(gate)
        return gate

    def close(self) -> None:
        for gate in self.gates:
            gate.release()
        for pool in self.pools:
            pool.stop(1.0)  # removes the shutdown trigger now; threads exit when released


@pytest.fixture
def pools():
    made = Pools()
    yield made
    made.close()


def shutdown_triggers() -> list[tuple[Any, ...]]:
    return list(_reactor()._eventTriggers["shutdown"].before)


# --- threads on demand ----------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_quick_jobs_finish_while_one_is_blocked(pools):
    pool = pools.pool(16)
    gate = pools.gate("slow")
    blocked = pool.run(gate)
    await within(gate.started)
    for i in range(5):
        assert await within(pool.run(operator.neg, i)) == -i
    assert not blocked.called
    # The blocked job's thread and one more, reused by all five quick jobs:
    # a result reaches the reactor only once its thread is idle again.
    stats = pool.stats()
    assert stats["io_threads_started"] == 2
    assert stats["io_threads_busy"] == 1 and stats["io_threads_idle"] == 1 and stats["io_queue"] == 0
    gate.release()
    assert await within(blocked) == "slow"


@pytest_twisted.ensureDeferred
async def test_concurrent_jobs_start_one_thread_each(pools):
    pool = pools.pool(16)
    gates = [pools.gate(i) for i in range(5)]
    results = [pool.run(gate) for gate in gates]
    await within(defer.gatherResults([gate.started for gate in gates]))  # all five run at once
    assert len({gate.thread_name for gate in gates}) == 5
    assert pool.stats()["io_threads_started"] == 5
    for gate in gates:
        gate.release()
    assert await within(defer.gatherResults(results)) == list(range(5))


@pytest_twisted.ensureDeferred
async def test_two_quick_submits_do_not_share_one_idle_thread(pools):
    pool = pools.pool(16)
    assert await within(pool.run(operator.neg, 1)) == -1
    assert pool.stats()["io_threads_idle"] == 1
    first, second = pools.gate("a"), pools.gate("b")
    results = [pool.run(first), pool.run(second)]  # same reactor turn
    # Both run: the second did not count the idle thread the first took.
    await within(defer.gatherResults([first.started, second.started]))
    assert pool.stats()["io_threads_started"] == 2
    first.release()
    second.release()
    assert await within(defer.gatherResults(results)) == ["a", "b"]


@pytest_twisted.ensureDeferred
async def test_never_more_than_max_threads(pools):
    pool = pools.pool(3)
    gates = [pools.gate(i) for i in range(6)]
    results = [pool.run(gate) for gate in gates]
    await within(defer.gatherResults([gate.started for gate in gates[:3]]))
    stats = pool.stats()
    assert stats["io_threads_started"] == 3 and stats["io_threads_alive"] == 3
    assert stats["io_threads_busy"] == 3 and stats["io_queue"] == 3
    assert not any(gate.started.called for gate in gates[3:])
    gates[0].release()
    await within(gates[3].started)  # the freed thread takes the oldest queued job
    assert not gates[4].started.called
    for gate in gates:
        gate.release()
    assert await within(defer.gatherResults(results)) == list(range(6))
    assert pool.stats()["io_threads_started"] == 3


@pytest_twisted.ensureDeferred
async def test_thread_names_and_daemon(pools):
    pool = pools.pool(2)
    name, daemon = await within(pool.run(lambda: (threading.current_thread().name,
                                                  threading.current_thread().daemon)))
    assert name == f"{pool.name}-0" and daemon is True


@pytest_twisted.ensureDeferred
async def test_idle_threads_exit_after_idle_timeout(pools):
    pool = pools.pool(4, idle_timeout=0.05)
    assert await within(pool.run(operator.neg, 1)) == -1
    deadline = time.monotonic() + 5
    while pool.stats()["io_threads_alive"] and time.monotonic() < deadline:
        await within(defer.Deferred.fromCoroutine(_sleep(0.02)))  # nothing to wait on but time
    assert pool.stats()["io_threads_alive"] == 0
    assert await within(pool.run(operator.neg, 2)) == -2  # and a new one starts on demand
    assert pool.stats()["io_threads_started"] == 2


async def _sleep(seconds: float) -> None:
    from twisted.internet import task

    await task.deferLater(_reactor(), seconds, lambda: None)


@pytest.mark.parametrize("contended", [False, True], ids=["quiet", "gil-contended"])
@pytest_twisted.ensureDeferred
async def test_starting_threads_does_not_stall_the_reactor(pools, contended):
    """16 submits that each start a thread.  threading.Thread.start() waits
    for each new thread to run: with a CPU-bound thread holding the GIL that
    took ~150 ms for 16 here; the pool's submits take about 1 ms."""
    spinning = threading.Event()
    done = threading.Event()

    def spin() -> None:
        spinning.set()
        while not done.is_set():
            pass

    if contended:
        threading.Thread(target=spin, daemon=True).start()
        spinning.wait(5)
    try:
        pool = pools.pool(16)
        gates = [pools.gate(i) for i in range(16)]
        t0 = time.perf_counter()
        results = [pool.run(gate) for gate in gates]
        elapsed = time.perf_counter() - t0
        await within(defer.gatherResults([gate.started for gate in gates]))
    finally:
        done.set()
    assert pool.stats()["io_threads_started"] == 16
    assert elapsed < 0.05, f"16 submits took {elapsed * 1000:.1f} ms"
    for gate in gates:
        gate.release()
    assert await within(defer.gatherResults(results)) == list(range(16))


@pytest_twisted.ensureDeferred
async def test_stats_keep_the_old_keys_as_ints(pools):
    pool = pools.pool(7)
    stats = pool.stats()
    assert {"io_threads", "io_threads_busy", "io_queue"} <= stats.keys()
    assert stats["io_threads"] == 7
    assert all(type(v) is int for v in stats.values())


# --- cancellation ---------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_cancel_while_queued_never_runs(pools):
    pool = pools.pool(1)
    gate = pools.gate("first")
    blocked = pool.run(gate)
    await within(gate.started)
    ran = []
    queued = pool.run(ran.append, "queued")
    assert pool.stats()["io_queue"] == 1
    queued.cancel()
    kind, failure = await outcome(queued)
    assert kind == "failed" and failure.check(defer.CancelledError)
    assert pool.stats()["io_queue"] == 0 and pool.stats()["io_cancelled_unstarted"] == 1
    after = pool.run(ran.append, "after")
    gate.release()
    assert await within(blocked) == "first"
    await within(after)
    assert ran == ["after"]  # the cancelled job was skipped, the next one ran


@pytest_twisted.ensureDeferred
async def test_cancel_while_running_hands_the_value_to_on_orphan(pools):
    pool = pools.pool(2)
    gate = pools.gate(7)  # say, a descriptor an open() produced
    orphaned: defer.Deferred[int] = defer.Deferred()
    d = pool.run(gate, on_orphan=orphaned.callback)
    await within(gate.started)
    d.cancel()
    kind, failure = await outcome(d)  # failed at once, while f still runs
    assert kind == "failed" and failure.check(defer.CancelledError)
    gate.release()
    assert await within(orphaned) == 7
    assert pool.stats()["io_orphans"] == 1


@pytest_twisted.ensureDeferred
async def test_cancel_while_running_drops_a_failure(pools):
    pool = pools.pool(1)
    started = defer.Deferred()
    release = threading.Event()
    orphans = []

    def fails() -> None:
        _reactor().callFromThread(started.callback, None)
        release.wait(JOB_TIMEOUT)
        raise OSError(errno.EIO, "read failed")

    d = pool.run(fails, on_orphan=orphans.append)
    await within(started)
    d.cancel()
    release.set()
    # Same thread, so its result is delivered before the next job's.
    assert await within(pool.run(operator.neg, 3)) == -3
    assert orphans == []
    kind, failure = await outcome(d)
    assert failure.check(defer.CancelledError)


@pytest_twisted.ensureDeferred
async def test_on_orphan_errors_are_logged(pools):
    from twisted.logger import globalLogPublisher

    logged: defer.Deferred[list[Failure]] = defer.Deferred()  # a bare Failure would errback

    def observe(event: dict[str, Any]) -> None:
        failure = event.get("log_failure")
        if failure is not None and failure.check(ValueError) and not logged.called:
            logged.callback([failure])

    globalLogPublisher.addObserver(observe)
    try:
        pool = pools.pool(1)
        gate = pools.gate("fd")

        def bad_orphan(value: Any) -> None:
            raise ValueError(f"cannot close {value}")

        d = pool.run(gate, on_orphan=bad_orphan)
        await within(gate.started)
        d.cancel()
        d.addErrback(lambda f: f.trap(defer.CancelledError))
        gate.release()
        [failure] = await within(logged)
    finally:
        globalLogPublisher.removeObserver(observe)
    assert "cannot close fd" in str(failure.value)
    assert await within(pool.run(operator.neg, 1)) == -1  # the pool carries on


class CustomBase(BaseException):
    pass


@pytest.mark.parametrize("exc", [
    ValueError("bad"),
    OSError(errno.EIO, "I/O error"),
    MemoryError(),
    CustomBase("custom"),
    KeyboardInterrupt(),
    SystemExit(3),
], ids=lambda e: type(e).__name__)
@pytest_twisted.ensureDeferred
async def test_exceptions_fail_the_deferred_with_their_type(pools, exc):
    pool = pools.pool(1)

    def raise_it() -> None:
        raise exc

    kind, failure = await outcome(pool.run(raise_it))
    assert kind == "failed" and failure.type is type(exc) and failure.value is exc
    # The thread survived it (KeyboardInterrupt and SystemExit included).
    assert await within(pool.run(operator.neg, 1)) == -1
    assert pool.stats()["io_threads_started"] == 1


# --- stop -----------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_stop_returns_at_once_and_fires_after_queued_jobs(pools):
    pool = pools.pool(1)
    gate = pools.gate("running")
    running = pool.run(gate)
    await within(gate.started)
    queued = pool.run(operator.neg, 5)  # a close that must still happen
    t0 = time.perf_counter()
    stopped = pool.stop(5.0)
    assert time.perf_counter() - t0 < 0.05
    assert not stopped.called
    order = []
    queued.addCallback(lambda v: order.append(("queued", v)))
    stopped.addCallback(lambda _: order.append(("stopped", None)))
    gate.release()
    assert await within(running) == "running"
    await within(stopped)
    assert order == [("queued", -5), ("stopped", None)]
    assert pool.stats()["io_threads_alive"] == 0


@pytest_twisted.ensureDeferred
async def test_stop_with_a_stuck_job_fires_after_its_timeout(pools):
    pool = pools.pool(2)
    gate = pools.gate("late")
    stuck = pool.run(gate)
    await within(gate.started)
    t0 = time.monotonic()
    await within(pool.stop(0.2))
    waited = time.monotonic() - t0
    assert 0.15 <= waited < 2.0
    assert not stuck.called and pool.stats()["io_threads_alive"] == 1
    # The pool still works beside the stuck thread.
    assert await within(pool.run(operator.neg, 4)) == -4
    gate.release()
    assert await within(stuck) == "late"


@pytest_twisted.ensureDeferred
async def test_run_after_stop_starts_threads_again(pools):
    pool = pools.pool(2)
    assert await within(pool.run(operator.neg, 1)) == -1
    await within(pool.stop())
    assert pool.stats()["io_threads_alive"] == 0
    assert await within(pool.run(operator.neg, 2)) == -2
    assert pool.stats()["io_threads_started"] == 2
    await within(pool.stop())
    await within(pool.stop())  # stopping a stopped pool: fires at once


@pytest_twisted.ensureDeferred
async def test_shutdown_trigger_is_registered_on_use_and_removed_by_stop(pools):
    pool = pools.pool(2)

    def ours() -> list[Any]:
        return [t for t in shutdown_triggers() if getattr(t[0], "__self__", None) is pool]

    assert ours() == []
    await within(pool.run(operator.neg, 1))
    assert len(ours()) == 1
    await within(pool.run(operator.neg, 1))
    assert len(ours()) == 1  # once
    await within(pool.stop())
    assert ours() == []
    await within(pool.run(operator.neg, 1))
    assert len(ours()) == 1  # used again after stop
    await within(pool.stop())
    assert ours() == []


def run_program(source: str, *args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": ROOT}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(source), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


SHUTDOWN_PROGRAM = """
    import json, sys, threading, time
    from twisted.internet import reactor
    from asyncfile.pool import IOPool

    mode = sys.argv[1]
    pool = IOPool(reactor, 2, shutdown_timeout=0.3)
    started = threading.Event()
    events = []

    def job():
        started.set()
        if mode == "slow":
            time.sleep(0.2)  # a slow close, say
            return "done"
        threading.Event().wait()  # a read on a dead NFS server

    pool.run(job).addBoth(lambda r: events.append(repr(r)))

    def stop():
        started.wait(5)
        reactor.stop()

    reactor.callWhenRunning(stop)
    t0 = time.monotonic()
    reactor.run()
    print(json.dumps({"elapsed": time.monotonic() - t0, "events": events, "stats": pool.stats()}))
"""


@pytest.mark.parametrize("mode", ["slow", "stuck"])
def test_reactor_shutdown_waits_for_the_pool_within_its_timeout(mode):
    out = run_program(SHUTDOWN_PROGRAM, mode)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.splitlines()[-1])
    if mode == "slow":  # shutdown waited for the job and its result
        assert result["events"] == ["'done'"] and result["stats"]["io_threads_alive"] == 0
        assert result["elapsed"] >= 0.15
    else:  # shutdown gave up after shutdown_timeout; the daemon thread does not keep the process
        assert result["events"] == [] and result["stats"]["io_threads_alive"] == 1
        assert 0.25 <= result["elapsed"] < 3


# --- fork -----------------------------------------------------------------

FORK_PROGRAM = """
    import json, os, sys, threading
    from twisted.internet import pollreactor
    pollreactor.install()
    from twisted.internet import defer, reactor, task
    from asyncfile.pool import IOPool, PoolForked

    def outcome(d):
        return d.addCallbacks(lambda v: ["ok", v],
                              lambda f: ["failed", f.type.__name__, str(f.value)]).addTimeout(5, reactor)

    def where():
        return [os.getpid(), threading.current_thread().name]

    async def main():
        # Parent and child share the reactor's waker pipe: one may read the
        # other's wake-up byte, so neither sleeps on it alone.
        task.LoopingCall(lambda: None).start(0.01)
        pool = IOPool(reactor, 1, name="forked")
        gate = threading.Event()
        started = defer.Deferred()

        def blocked():
            reactor.callFromThread(started.callback, None)
            gate.wait(10)
            return "blocked-done"

        d_blocked = pool.run(blocked)
        d_queued = pool.run(lambda: "queued-done")
        await started
        sys.stdout.flush()
        pid = os.fork()
        if pid == 0:
            try:
                out = {"pid": os.getpid()}
                out["blocked"] = await outcome(d_blocked)
                out["queued"] = await outcome(d_queued)
                out["stats_before"] = pool.stats()
                out["new"] = await outcome(pool.run(where))
                out["new2"] = await outcome(pool.run(where))
                out["stats_after"] = pool.stats()
                print("child " + json.dumps(out), flush=True)
            finally:
                os._exit(0)
        out = {"pid": os.getpid(), "child": pid}
        out["stats_at_fork"] = pool.stats()
        gate.set()
        out["blocked"] = await outcome(d_blocked)
        out["queued"] = await outcome(d_queued)
        out["new"] = await outcome(pool.run(where))
        for _ in range(1000):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                out["child_exit"] = os.waitstatus_to_exitcode(status)
                break
            await task.deferLater(reactor, 0.01, lambda: None)
        print("parent " + json.dumps(out), flush=True)

    def failed(f):
        f.printTraceback()
        global code
        code = 1

    code = 0
    d = defer.Deferred.fromCoroutine(main())
    d.addErrback(failed).addBoth(lambda _: reactor.stop())
    reactor.run()
    sys.exit(code)
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork()")
def test_fork_child_fails_the_parents_jobs_and_works_and_the_parent_is_unaffected():
    out = run_program(FORK_PROGRAM)
    assert out.returncode == 0, out.stdout + out.stderr
    lines = dict(line.split(" ", 1) for line in out.stdout.splitlines() if " " in line)
    assert {"parent", "child"} <= lines.keys(), out.stdout + out.stderr
    parent, child = json.loads(lines["parent"]), json.loads(lines["child"])

    # The child: the parent's running and queued jobs fail at once with PoolForked ...
    for key in ("blocked", "queued"):
        kind, exc_type, message = child[key]
        assert (kind, exc_type) == ("failed", "PoolForked")
        assert "lost at fork()" in message
    # ... from a fresh pool, in which new jobs start a thread and work.
    assert child["stats_before"]["io_threads_alive"] == 0 and child["stats_before"]["io_queue"] == 0
    assert child["new"] == ["ok", [child["pid"], "forked-0"]]
    assert child["new2"] == ["ok", [child["pid"], "forked-0"]]
    assert child["stats_after"]["io_threads_started"] == 1

    # The parent: untouched.
    assert parent["stats_at_fork"]["io_threads_busy"] == 1 and parent["stats_at_fork"]["io_queue"] == 1
    assert parent["blocked"] == ["ok", "blocked-done"]
    assert parent["queued"] == ["ok", "queued-done"]
    assert parent["new"] == ["ok", [parent["pid"], "forked-0"]]
    assert parent["child_exit"] == 0


def test_pool_forked_is_a_runtime_error_saying_so():
    err = PoolForked("asyncfile-io")
    assert isinstance(err, RuntimeError) and "lost at fork()" in str(err)
    assert isinstance(Failure(err).value, PoolForked)
