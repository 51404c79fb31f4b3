"""A bounded job queue drained by K cooperative workers that can be paused.

What it shows
    * ``defer.DeferredQueue(size=S)`` as the buffer between a producer and K
      workers.  ``put()`` raises ``defer.QueueOverflow`` *synchronously* when S
      jobs are already waiting; the producer counts those refusals instead of
      buffering without limit.
    * K workers, each a plain generator run by ``task.cooperate`` (one
      ``CooperativeTask`` per worker).  A worker yields the Deferred from
      ``queue.get()``, then the Deferred of its job; the Cooperator resumes
      the generator when that Deferred has fired.
    * ``CooperativeTask.pause()`` / ``resume()``: while paused, the
      Cooperator does not advance the worker generators.  They pick no new
      job and record no job as done; the queue fills up and the producer is
      refused.  The program prints a timeline, counts what happened during
      the pause and exits non-zero if any job started or completed then.

    One detail the timeline makes visible: ``pause()`` does not cancel a
    Deferred the generator has already yielded.  Work already in flight
    still finishes during the pause, but the paused worker only sees the
    result after ``resume()``.  Likewise, a worker that was waiting in
    ``queue.get()`` when paused can still be handed a job by ``put()``; it
    starts that job after ``resume()``.

Why
    Because ``put`` never blocks, a producer that is faster than its consumers
    grows an unbounded list unless the queue has a size.  With ``size=``, the
    overload shows up at the producer, where it can be handled: drop the job,
    answer "busy", or slow down.  ``task.cooperate`` gives each worker a handle
    to pause, resume or stop, and the global Cooperator time-slices CPU work so
    that no worker hogs the reactor.

When to choose it
    Choose it for in-process background work fed by events (uploads to
    thumbnail, files to index, messages to forward), when you want a fixed
    number of workers, backpressure at the producer and a switch to halt
    consumption during maintenance, a downstream outage or a shutdown.  To
    simply cap how many calls run at once, a ``DeferredSemaphore`` is
    simpler (see ``pb_semaphore_queue.py``).  To have separate processes or
    machines share the work, use a real broker.

Run it:

    python examples/deferred_queue_workers.py [--workers 4] [--size 20]
        [--job-ms 5] [--pause-ms 100]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

from twisted.internet import defer, task

# Producer shape: one burst, then a steady trickle.
FIRST_BURST = 30
JOBS_PER_TICK = 4
TICK_MS = 10
TICKS = 40
PAUSE_AT_MS = 120
BUCKET_MS = 25


@dataclass
class Job:
    id: int
    put_at: float
    taken_at: float | None = None  # queue.get() handed it to a worker
    started_at: float | None = None  # the worker generator began it
    work_done_at: float | None = None  # its work Deferred fired
    finished_at: float | None = None  # the worker generator recorded it done
    worker: str = ""
    result: int | None = None


@dataclass
class Run:
    """Shared bookkeeping; all of it runs in the reactor thread."""

    t0: float
    paused: bool = False
    pause_at: float = 0.0
    resume_at: float = 0.0
    in_flight: set[int] = field(default_factory=set)
    in_flight_at_pause: int = 0
    done: list[Job] = field(default_factory=list)
    refused_at: list[float] = field(default_factory=list)
    put_at: list[float] = field(default_factory=list)
    started_while_paused: int = 0
    finished_while_paused: int = 0
    work_fired_while_paused: int = 0
    taken_while_paused: int = 0
    depth_samples: list[tuple[float, int]] = field(default_factory=list)


def worker(
    name: str, queue: defer.DeferredQueue[Job | None], run: Run, reactor, job_s: float
) -> Iterator[defer.Deferred]:
    """One worker: a generator that the Cooperator drives.

    ``cooperate`` does not send a Deferred's result back into the generator,
    so the worker keeps the result itself (``got``) via a callback.
    """
    while True:
        got: list[Job | None] = []

        def take(job: Job | None) -> None:
            got.append(job)
            if job is not None:
                job.taken_at = time.perf_counter()
                run.taken_while_paused += run.paused

        yield queue.get().addCallback(take)  # resumed once a job is ours
        job = got[0]
        if job is None:  # sentinel: no more jobs
            return

        job.started_at = time.perf_counter()
        job.worker = name
        run.started_while_paused += run.paused
        run.in_flight.add(job.id)

        def work(job: Job = job) -> int:  # the simulated unit of work
            job.work_done_at = time.perf_counter()
            run.work_fired_while_paused += run.paused
            return sum(i * i for i in range(job.id % 50 + 50))

        work_d = task.deferLater(reactor, job_s, work)
        work_d.addCallback(lambda result, job=job: setattr(job, "result", result))
        yield work_d  # resumed once the work is done (and we are not paused)

        job.finished_at = time.perf_counter()
        run.finished_while_paused += run.paused
        run.in_flight.discard(job.id)
        run.done.append(job)


async def produce(reactor, queue: defer.DeferredQueue[Job | None], run: Run) -> int:
    """Put jobs without waiting for room; count QueueOverflow refusals."""
    next_id = 0

    def put_some(n: int) -> None:
        nonlocal next_id
        for _ in range(n):
            now = time.perf_counter()
            job = Job(next_id, now)
            next_id += 1
            try:
                queue.put(job)  # never blocks: takes it or raises at once
            except defer.QueueOverflow:
                run.refused_at.append(now)
            else:
                run.put_at.append(now)

    put_some(FIRST_BURST)
    for _ in range(TICKS):
        await task.deferLater(reactor, TICK_MS / 1000, lambda: None)
        put_some(JOBS_PER_TICK)
    return next_id


async def pause_workers_for(reactor, tasks, run: Run, pause_s: float) -> None:
    await task.deferLater(reactor, PAUSE_AT_MS / 1000, lambda: None)
    run.pause_at = time.perf_counter()
    run.in_flight_at_pause = len(run.in_flight)
    run.paused = True
    for t in tasks:
        t.pause()
    await task.deferLater(reactor, pause_s, lambda: None)
    run.resume_at = time.perf_counter()
    run.paused = False
    for t in tasks:
        t.resume()


def rel_ms(run: Run, t: float) -> float:
    return (t - run.t0) * 1000


def print_timeline(run: Run, total_ms: float) -> None:
    def bucket(t: float) -> int:
        return int(rel_ms(run, t) // BUCKET_MS)

    puts = Counter(bucket(t) for t in run.put_at)
    refused = Counter(bucket(t) for t in run.refused_at)
    started = Counter(bucket(j.started_at) for j in run.done)
    finished = Counter(bucket(j.finished_at) for j in run.done)
    depth: dict[int, int] = {}
    for t, d in run.depth_samples:
        depth[bucket(t)] = max(depth.get(bucket(t), 0), d)
    pause_b, resume_b = bucket(run.pause_at), bucket(run.resume_at)

    print(
        f"timeline, {BUCKET_MS} ms per row: jobs put() into the queue or refused "
        f"with QueueOverflow,\nstarted and completed by workers, most jobs "
        f"waiting in the queue"
    )
    print("   t ms  accepted  refused  started  done  in queue  workers")
    for b in range(int(total_ms // BUCKET_MS) + 1):
        if b == pause_b:
            state = f"pause() at {rel_ms(run, run.pause_at):.0f} ms"
        elif b == resume_b:
            state = f"resume() at {rel_ms(run, run.resume_at):.0f} ms"
        elif pause_b < b < resume_b:
            state = "PAUSED"
        else:
            state = "running"
        print(
            f"  {b * BUCKET_MS:5d}  {puts[b]:8d}  {refused[b]:7d}  {started[b]:7d}"
            f"  {finished[b]:4d}  {depth.get(b, 0):8d}  {state}"
        )


async def main(reactor, args: argparse.Namespace) -> None:
    job_s = args.job_ms / 1000
    queue: defer.DeferredQueue[Job | None] = defer.DeferredQueue(size=args.size)
    run = Run(t0=time.perf_counter())
    print(
        f"{args.workers} workers (task.cooperate) draining DeferredQueue(size="
        f"{args.size}), {args.job_ms:g} ms of simulated work per job\n"
        f"producer: {FIRST_BURST} jobs at once, then {JOBS_PER_TICK} every "
        f"{TICK_MS} ms for {TICKS * TICK_MS} ms; workers paused at "
        f"{PAUSE_AT_MS} ms for {args.pause_ms:g} ms\n"
    )

    sampler = task.LoopingCall(
        lambda: run.depth_samples.append((time.perf_counter(), len(queue.pending)))
    )
    sampler.start(0.005)

    tasks = [
        task.cooperate(worker(f"w{i}", queue, run, reactor, job_s))
        for i in range(args.workers)
    ]
    pauser = defer.Deferred.fromCoroutine(
        pause_workers_for(reactor, tasks, run, args.pause_ms / 1000)
    )
    produced = await produce(reactor, queue, run)
    await pauser

    # Tell each worker to stop.  These puts must not be lost, so unlike the
    # producer's they wait for room instead of giving up.
    for _ in tasks:
        while True:
            try:
                queue.put(None)
                break
            except defer.QueueOverflow:
                await task.deferLater(reactor, 0.002, lambda: None)
    await defer.gatherResults([t.whenDone() for t in tasks])
    total_s = time.perf_counter() - run.t0
    sampler.stop()

    print_timeline(run, total_s * 1000)
    print()

    accepted, refused = len(run.put_at), len(run.refused_at)
    in_pause = sum(run.pause_at <= t <= run.resume_at for t in run.refused_at)
    ok = True
    print(
        f"jobs: {produced} produced, {accepted} accepted, {refused} refused "
        f"with QueueOverflow ({in_pause} of them while the workers were paused)"
    )
    per_worker = Counter(j.worker for j in run.done)
    print(
        f"jobs done: {len(run.done)} of {accepted} accepted; per worker: "
        + ", ".join(f"{w} {n}" for w, n in sorted(per_worker.items()))
    )
    if len(run.done) != accepted or accepted + refused != produced:
        print("MISMATCH: some accepted job was not done")
        ok = False
    wrong = sum(j.result != sum(i * i for i in range(j.id % 50 + 50)) for j in run.done)
    if wrong:
        print(f"MISMATCH: {wrong} wrong results")
        ok = False
    waits = sorted(j.started_at - j.put_at for j in run.done)
    print(
        f"time in queue ms: min {waits[0] * 1000:.1f} / median "
        f"{statistics.median(waits) * 1000:.1f} / max {waits[-1] * 1000:.1f}; "
        f"most jobs queued at once: {max(d for _, d in run.depth_samples)} "
        f"(size {args.size})"
    )
    pause_ms = (run.resume_at - run.pause_at) * 1000
    clean = run.started_while_paused == 0 and run.finished_while_paused == 0
    print(
        f"pause: {len(tasks)} worker tasks paused for {pause_ms:.1f} ms; while "
        f"paused {run.started_while_paused} jobs started and "
        f"{run.finished_while_paused} completed " + ("(OK)" if clean else "(VIOLATED)")
    )
    print(
        f"  at pause(), {run.in_flight_at_pause} jobs were started but not yet "
        f"recorded done; the work of {run.work_fired_while_paused} of them "
        f"finished during the pause (pause() does not cancel a Deferred "
        f"already yielded), but their workers recorded them only after resume()"
    )
    print(
        f"  {run.taken_while_paused} jobs were handed by queue.get() to paused "
        f"workers; they started after resume()"
    )
    print(f"total time: {total_s:.3f} s")
    if not clean:
        ok = False
    if not ok:
        print("FAILED: see the lines above")
        raise SystemExit(1)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workers", type=int, default=4, help="K: worker tasks")
    p.add_argument("--size", type=int, default=20, help="S: DeferredQueue size")
    p.add_argument("--job-ms", type=float, default=5.0, help="simulated work per job")
    p.add_argument("--pause-ms", type=float, default=100.0, help="how long to pause")
    args = p.parse_args(argv)
    if args.workers < 1 or args.size < 1 or args.job_ms < 0 or args.pause_ms < 0:
        p.error("--workers and --size must be >= 1, the others >= 0")
    return args


if __name__ == "__main__":
    task.react(main, (parse_args(sys.argv[1:]),))
