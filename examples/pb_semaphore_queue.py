"""Keep a Perspective Broker server standing when hundreds of calls arrive at once.

What it shows
    A ``pb.Root`` whose ``remote_process(n)`` runs its work through a
    ``defer.DeferredSemaphore(N)``: however many calls arrive, at most N run at
    once and the rest wait their turn in the semaphore's FIFO.  A
    ``pb.PBClientFactory`` in the same process fires hundreds of calls in one
    go.  The program measures, inside the server, the peak number of calls
    running at once (and exits non-zero if it ever exceeds N), the queueing
    delay of each call (arrival to semaphore acquired), the client-side
    latencies and the total time.

    Round 1 shows the catch: a ``DeferredSemaphore`` never refuses anyone, so
    ``len(sem.waiting)`` grows with the burst.  Every waiter holds a Deferred,
    its arguments and a pending PB answer; a big enough burst means unbounded
    memory and unbounded latency.

    Rounds 2 and 3 show the fix: when M calls are already waiting, further
    calls are refused at once with ``Busy``, a ``pb.Error`` subclass (the
    server logs no traceback for ``pb.Error``), and the client counts the
    refusals.  Round 2 raises a plain ``pb.Error`` subclass: it travels as a
    ``CopyableFailure`` and the client sees ``pb.RemoteError`` whose
    ``remoteType`` names the class.  Round 3 raises ``CopyableBusy``, which is
    also ``pb.Copyable``/``pb.RemoteCopy``: it travels as a small object and
    the client catches ``Busy`` itself.  Compare the two rounds' numbers: a
    refusal is not free in PB.  The reply carrying a ``CopyableFailure`` is 84
    banana tokens, against 12 for ``CopyableBusy`` and 4 for an int answer,
    and banana's decoder copies the rest of its buffer for every token.  So
    hundreds of plain refusals stall the reactor (here the server and the
    client share one reactor, so both ends of the cost show up in the
    accepted calls' waiting times).

Why
    A PB server "falls over" under a burst not because Twisted cannot accept
    the calls but because every call starts its work at once: hundreds of
    ``deferToThread`` jobs queued in the reactor's 10-thread pool (which DNS
    lookups share), hundreds of database connections, hundreds of large
    buffers.
    Limiting concurrency takes one line.  Bounding the queue in front of it is
    the part that usually gets forgotten.

When to choose it
    * ``DeferredSemaphore(N)`` alone: callers are trusted and bursts are
      bounded (an internal service with a known set of clients), and everyone
      waiting is better than anyone failing.
    * Semaphore + bounded waiters + ``Busy``: callers are many or untrusted, or
      a late answer is worthless.  Fail fast and let the client retry with
      backoff (the same shape as imgproxy's workers + queue size + HTTP 429).
      Send ``Busy`` as a Copyable if refusals can come in floods.

The simulated work is ``task.deferLater`` of a few milliseconds.  It stands in
for an I/O call or a ``deferToThread`` job.  Run it:

    python examples/pb_semaphore_queue.py [--calls 300] [--limit 10]
                                          [--max-waiting 50] [--work-ms 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass, field

from twisted.internet import defer, endpoints, task
from twisted.internet.interfaces import IReactorTime
from twisted.python import reflect
from twisted.spread import pb


class Busy(pb.Error):
    """Refused: too many calls are already waiting.  Try again later.

    Raised as is, it reaches the client as ``pb.RemoteError`` with
    ``remoteType == "<module>.Busy"`` and the message as its text.
    """

    def __init__(self, waiting: int = 0) -> None:
        super().__init__(f"{waiting} calls already waiting")
        self.waiting = waiting


class CopyableBusy(Busy, pb.Copyable, pb.RemoteCopy):
    """``Busy`` sent as a small copyable object instead of a CopyableFailure.

    Both ends must import this class (and register it, below); the client's
    errback then gets a real ``CopyableBusy``, so ``except Busy`` works.
    """

    def getStateToCopy(self) -> dict[str, int]:
        return {"waiting": self.waiting}

    def setCopyableState(self, state: dict[str, int]) -> None:
        Busy.__init__(self, state["waiting"])


pb.setUnjellyableForClass(CopyableBusy, CopyableBusy)


@dataclass
class Stats:
    """What the server saw; read by the client side once the round is over."""

    active: int = 0
    peak_active: int = 0
    peak_waiting: int = 0
    refused: int = 0
    queue_delays: list[float] = field(default_factory=list)


class WorkRoot(pb.Root):
    """PB root object that runs ``process`` calls at most ``limit`` at a time.

    With ``max_waiting`` set, a call that would be waiter number
    max_waiting + 1 is refused with ``busy_type`` instead of being queued.
    """

    def __init__(
        self,
        reactor: IReactorTime,
        limit: int,
        work_seconds: float,
        max_waiting: int | None = None,
        busy_type: type[Busy] = Busy,
    ) -> None:
        self.reactor = reactor
        self.sem = defer.DeferredSemaphore(limit)
        self.work_seconds = work_seconds
        self.max_waiting = max_waiting
        self.busy_type = busy_type
        self.stats = Stats()

    # NB: not ``async def``: PB would send the coroutine object back as an
    # Unpersistable.  Return a Deferred.
    def remote_process(self, n: int) -> defer.Deferred[int]:
        waiting = len(self.sem.waiting)
        if (
            self.max_waiting is not None
            and self.sem.tokens == 0
            and waiting >= self.max_waiting
        ):
            self.stats.refused += 1
            raise self.busy_type(waiting)
        arrived = time.perf_counter()
        d = self.sem.run(self._work, n, arrived)
        self.stats.peak_waiting = max(self.stats.peak_waiting, len(self.sem.waiting))
        return d

    def _work(self, n: int, arrived: float) -> defer.Deferred[int]:
        # Runs while holding one semaphore token.
        st = self.stats
        st.queue_delays.append(time.perf_counter() - arrived)
        st.active += 1
        st.peak_active = max(st.peak_active, st.active)
        d = task.deferLater(self.reactor, self.work_seconds, lambda: n * n)

        def done(result: object) -> object:
            st.active -= 1
            return result

        return d.addBoth(done)


@dataclass
class RoundResult:
    answered: int = 0
    refused: int = 0
    wrong_results: int = 0
    seconds: float = 0.0
    other_errors: list[str] = field(default_factory=list)
    answer_latency: list[float] = field(default_factory=list)  # sent -> answer
    refusal_latency: list[float] = field(default_factory=list)  # sent -> Busy


async def fire_burst(reactor, root_obj: WorkRoot, calls: int) -> RoundResult:
    """Serve ``root_obj`` on a free port, fire ``calls`` calls at once, clean up."""
    server_ep = endpoints.TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1")
    port = await server_ep.listen(pb.PBServerFactory(root_obj))
    client = pb.PBClientFactory()
    try:
        addr = port.getHost()
        client_ep = endpoints.TCP4ClientEndpoint(reactor, addr.host, addr.port)
        await client_ep.connect(client)
        remote = await client.getRootObject()

        res = RoundResult()
        busy_name = reflect.qual(Busy)

        async def one_call(n: int) -> None:
            sent = time.perf_counter()
            try:
                result = await remote.callRemote("process", n)
            except Busy:  # CopyableBusy: the class itself crossed the wire
                res.refused += 1
                res.refusal_latency.append(time.perf_counter() - sent)
            except pb.RemoteError as e:  # any other pb.Error: only its name
                remote_type = e.remoteType
                if isinstance(remote_type, bytes):
                    remote_type = remote_type.decode()
                if remote_type == busy_name:
                    res.refused += 1
                    res.refusal_latency.append(time.perf_counter() - sent)
                else:
                    res.other_errors.append(f"{remote_type}: {e}")
            else:
                res.answered += 1
                res.answer_latency.append(time.perf_counter() - sent)
                if result != n * n:
                    res.wrong_results += 1

        start = time.perf_counter()
        # Each coroutine runs up to its first await right here, so all the
        # calls are written to the connection before any answer can arrive.
        ds = [defer.Deferred.fromCoroutine(one_call(n)) for n in range(calls)]
        await defer.gatherResults(ds, consumeErrors=True)
        res.seconds = time.perf_counter() - start

        # Disconnect and wait until the client side has seen it.
        gone: defer.Deferred[None] = defer.Deferred()
        remote.notifyOnDisconnect(lambda _ref: gone.callback(None))
        client.disconnect()
        await gone
    finally:
        client.disconnect()  # no-op once disconnected
        await port.stopListening()
    return res


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}"


def spread(values: list[float]) -> str:
    """min / median / p90 / max of durations in seconds, as milliseconds."""
    v = sorted(values)
    p90 = v[min(len(v) - 1, int(0.9 * len(v)))]
    return (
        f"min {ms(v[0])} / median {ms(statistics.median(v))} / "
        f"p90 {ms(p90)} / max {ms(v[-1])}"
    )


def report(root_obj: WorkRoot, res: RoundResult, calls: int, limit: int) -> bool:
    """Print one round's numbers; return False if something is wrong."""
    st = root_obj.stats
    print(
        f"calls: {calls} sent, {res.answered} answered, {res.refused} refused "
        f"with Busy, {len(res.other_errors)} other errors, "
        f"{res.wrong_results} wrong results"
    )
    for line in res.other_errors[:5]:
        print(f"  error: {line}")
    ok = st.peak_active <= limit
    print(
        f"peak concurrency inside the server: {st.peak_active} (limit {limit}) "
        + ("OK" if ok else "VIOLATED")
    )
    if root_obj.max_waiting is None:
        print(f"peak waiters, len(sem.waiting): {st.peak_waiting} (no bound)")
    else:
        within = st.peak_waiting <= root_obj.max_waiting
        ok = ok and within
        print(
            f"peak waiters, len(sem.waiting): {st.peak_waiting} "
            f"(bound {root_obj.max_waiting}) " + ("OK" if within else "VIOLATED")
        )
    if st.queue_delays:
        print(
            f"queueing delay ms in the server, {len(st.queue_delays)} accepted "
            f"calls: {spread(st.queue_delays)}"
        )
    if res.answer_latency:
        print(f"client latency ms, answers: {spread(res.answer_latency)}")
    if res.refusal_latency:
        print(f"client latency ms, Busy:    {spread(res.refusal_latency)}")
    work_s = root_obj.work_seconds
    floor = (res.answered / limit) * work_s
    print(
        f"total time: {res.seconds:.3f} s for {res.answered} answers "
        f"(floor {res.answered}/{limit} x {ms(work_s)} ms = {floor:.3f} s)"
    )
    if res.refused != st.refused:
        print(f"mismatch: server refused {st.refused}, client counted {res.refused}")
        ok = False
    return ok and not res.other_errors and res.wrong_results == 0


async def main(reactor, args: argparse.Namespace) -> None:
    work_s = args.work_ms / 1000
    n, m = args.limit, args.max_waiting
    rounds = [
        (
            f"Round 1: DeferredSemaphore({n}), no bound on waiters",
            WorkRoot(reactor, n, work_s),
        ),
        (
            f"Round 2: DeferredSemaphore({n}) + at most {m} waiting, "
            f"then Busy(pb.Error), seen as pb.RemoteError",
            WorkRoot(reactor, n, work_s, max_waiting=m),
        ),
        (
            f"Round 3: as round 2, Busy sent as pb.Copyable, caught as Busy",
            WorkRoot(reactor, n, work_s, max_waiting=m, busy_type=CopyableBusy),
        ),
    ]
    print(
        f"{args.calls} calls fired at once per round, {args.work_ms:g} ms of "
        f"simulated work per call\n"
    )
    all_ok = True
    results: list[RoundResult] = []
    for title, root_obj in rounds:
        print(f"== {title} ==")
        res = await fire_burst(reactor, root_obj, args.calls)
        all_ok &= report(root_obj, res, args.calls, n)
        results.append(res)
        print()
    if results[0].refused:
        print("unexpected: the plain semaphore refused calls")
        all_ok = False

    r1, r2, r3 = (root_obj.stats for _title, root_obj in rounds)
    print("Trade-off:")
    print(
        f"  round 1 answered all {results[0].answered} calls but held up to "
        f"{r1.peak_waiting} of them waiting in memory; the last waited "
        f"{ms(max(r1.queue_delays))} ms for its turn. Twice the burst, twice "
        f"the queue and the wait: there is no limit."
    )
    print(
        f"  rounds 2 and 3 held at most {max(r2.peak_waiting, r3.peak_waiting)} "
        f"waiting and refused {results[1].refused} and {results[2].refused} "
        f"calls at once; those clients can back off and retry."
    )
    print(
        f"  refusals are not free: all of round 2's Busy failures reached the "
        f"client within {ms(max(results[1].refusal_latency, default=0))} ms, "
        f"round 3's copyable ones within "
        f"{ms(max(results[2].refusal_latency, default=0))} ms; the accepted "
        f"calls' longest wait was {ms(max(r2.queue_delays, default=0))} vs "
        f"{ms(max(r3.queue_delays, default=0))} ms "
        f"({m}/{n} x {args.work_ms:g} ms = {m / n * args.work_ms:g} ms "
        f"if refusing cost nothing)."
    )

    if not all_ok:
        print("FAILED: see the lines above")
        raise SystemExit(1)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calls", type=int, default=300, help="calls fired at once")
    p.add_argument("--limit", type=int, default=10, help="N: calls running at once")
    p.add_argument(
        "--max-waiting", type=int, default=50, help="M: waiters before Busy"
    )
    p.add_argument("--work-ms", type=float, default=5.0, help="simulated work per call")
    args = p.parse_args(argv)
    if args.calls < 1 or args.limit < 1 or args.max_waiting < 0 or args.work_ms < 0:
        p.error("--calls and --limit must be >= 1, the others >= 0")
    return args


if __name__ == "__main__":
    task.react(main, (parse_args(sys.argv[1:]),))
