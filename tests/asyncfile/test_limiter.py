"""Limiter: FIFO admission, bounded waiting, cancellation — deterministic, no reactor."""

import pytest
from twisted.internet import defer

from asyncfile import Limiter, Overloaded


def test_runs_at_most_limit_and_queues_fifo():
    limiter = Limiter(2, max_waiting=10)
    gates = [defer.Deferred() for _ in range(5)]
    started = []

    def job(i):
        started.append(i)
        return gates[i]

    results = [limiter.run(job, i) for i in range(5)]
    assert started == [0, 1] and limiter.active == 2 and limiter.waiting == 3
    gates[1].callback("b")
    assert started == [0, 1, 2]
    gates[0].callback("a")
    assert started == [0, 1, 2, 3]
    for i in (2, 3):
        gates[i].callback(i)
    gates[4].callback(4)
    assert [r.result for r in results] == ["a", "b", 2, 3, 4]
    assert limiter.active == 0 and limiter.waiting == 0 and limiter.peak_active == 2


def test_refuses_when_the_queue_is_full():
    limiter = Limiter(1, max_waiting=2)
    gate = defer.Deferred()
    limiter.run(lambda: gate)
    waiting = [limiter.run(lambda: "ok") for _ in range(2)]
    refused = limiter.run(lambda: "never")
    failure = []
    refused.addErrback(failure.append)
    assert failure and failure[0].check(Overloaded)
    assert failure[0].value.limit == 1 and failure[0].value.waiting == 2
    assert limiter.stats()["rejected"] == 1
    gate.callback(None)
    assert [w.result for w in waiting] == ["ok", "ok"]


def test_zero_max_waiting_never_queues_and_none_is_unbounded():
    limiter = Limiter(1, max_waiting=0)
    limiter.run(defer.Deferred)
    with pytest.raises(Overloaded):
        limiter.acquire().result.raiseException()
    unbounded = Limiter(1, max_waiting=None)
    unbounded.run(defer.Deferred)
    for _ in range(10000):
        unbounded.run(lambda: None)
    assert unbounded.waiting == 10000


def test_cancel_while_waiting_leaves_the_queue():
    limiter = Limiter(1, max_waiting=1)
    gate = defer.Deferred()
    limiter.run(lambda: gate)
    ran = []
    waiter = limiter.run(lambda: ran.append(1))
    waiter.cancel()
    failure = []
    waiter.addErrback(failure.append)
    assert failure[0].check(defer.CancelledError)
    assert limiter.waiting == 0 and limiter.cancelled == 1
    after = limiter.run(lambda: "next")  # the freed place is usable
    gate.callback(None)
    assert after.result == "next" and ran == []


def test_cancel_while_running_cancels_the_work_and_frees_the_place():
    limiter = Limiter(1)
    cancelled = []
    work = defer.Deferred(lambda d: cancelled.append(True))
    running = limiter.run(lambda: work)
    queued = limiter.run(lambda: "second")
    running.cancel()
    running.addErrback(lambda f: f.trap(defer.CancelledError))
    assert cancelled and queued.result == "second" and limiter.active == 0


def test_failures_pass_through_and_release():
    limiter = Limiter(1)

    def boom():
        raise KeyError("x")

    d = limiter.run(boom)
    failure = []
    d.addErrback(failure.append)
    assert failure[0].check(KeyError) and limiter.active == 0


def test_synchronous_work_does_not_recurse():
    """Thousands of queued jobs finishing synchronously: a trampoline, not a stack."""
    limiter = Limiter(1, max_waiting=None)
    gate = defer.Deferred()
    limiter.run(lambda: gate)
    results = [limiter.run(lambda i=i: i) for i in range(20000)]
    gate.callback(None)
    assert [r.result for r in results] == list(range(20000))


def test_slots_release_once():
    limiter = Limiter(1)
    slot = limiter.acquire().result
    slot.release()
    slot.release()
    assert limiter.active == 0


def test_bad_settings():
    with pytest.raises(ValueError):
        Limiter(0)
    with pytest.raises(ValueError):
        Limiter(1, max_waiting=-1)
