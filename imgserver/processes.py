"""``imgserver --processes N``: one parent, N worker processes serving the same ports.

One Twisted process parses HTTP on one core; to use more cores the parent
binds the listening sockets once and starts N workers (``python -m imgserver
... --worker-sockets JSON``) that serve them:

- ``--balance shared`` (the default): the parent binds *and listens*; every
  worker adopts the same listening socket (``reactor.adoptStreamPort``) and
  the kernel hands each new connection to whichever worker accepts first.  A
  busy worker does not accept, so connections go to the idle ones, and a
  worker that stops (drain, restart, crash) leaves nothing queued behind it:
  the connections waiting in the backlog are accepted by the others.
- ``--balance reuseport``: the parent binds without listening (it only
  reserves the address); each worker binds its own socket with
  ``SO_REUSEPORT`` and listens.  The kernel spreads connections by a hash
  of their addresses, whatever each worker is doing, and the connections
  queued on a worker's socket when it closes are reset.

The parent has no ImageService and answers nothing itself.  It restarts a
worker that dies (back-off 0.1 s doubling to 30 s, reset once a worker lived
30 s; it gives up, exiting 1, when one worker cannot start
:data:`MAX_START_FAILURES` times in a row -- a worker that cannot even be
spawned, fork or exec failing, counts as one that could not start), forwards SIGTERM/SIGINT (every
worker drains as ``Server.stop(grace)``; exit 0 once all exited within
``--grace`` + :data:`EXIT_MARGIN`, stragglers are killed and the exit status
is 1) and restarts the workers one at a time on SIGHUP (each replacement is
ready before the worker it replaces starts draining).

Workers get ``IMGSERVER_WORKER_ID`` (0..N-1), ``IMGSERVER_WORKERS`` (N) and
``IMGSERVER_RUN_DIR`` (a private directory the parent creates and removes)
where they publish their snapshots (:mod:`imgserver.cluster`) and the parent
writes ``parent.json`` (restart counts, worker pids).  Each worker's stdin is
a pipe from the parent: when it closes (the parent is gone, even killed with
SIGKILL, during a drain too) the worker drains and exits rather than serve
orphaned, and the last worker out removes the run directory.  The worker
says it is ready on its descriptor 3.  Kill deadlines and the ready timeout
also wait on the monotonic clock (Twisted's timers follow the wall clock).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from twisted.internet import defer, endpoints, error, protocol, task
from twisted.logger import Logger
from twisted.python.failure import Failure

__all__ = [
    "BALANCES", "DEFAULT_BALANCE", "MAX_START_FAILURES", "EXIT_MARGIN", "READY_TIMEOUT",
    "Listener", "bind_listener", "adopt_listener", "Supervisor", "processes_count", "run_parent",
    "worker_environment",
]

log = Logger(namespace="imgserver.processes")

BALANCES = ("shared", "reuseport")
#: Measured on 2 cores (see the README): the shared socket balances by load and loses nothing on a drain.
DEFAULT_BALANCE = "shared"
#: A worker slot that fails this many times in a row before it is ready makes the parent give up.
MAX_START_FAILURES = 5
#: Seconds beyond ``--grace`` the parent waits for its workers to exit before killing them.
EXIT_MARGIN = 5.0
#: Seconds a (re)started worker may take to say it is ready.
READY_TIMEOUT = 60.0
BACKOFF_FIRST = 0.1
BACKOFF_MAX = 30.0
#: A worker alive this long resets its slot's back-off.
BACKOFF_RESET_AFTER = 30.0

#: The descriptors of a worker: 0 control pipe from the parent, 1/2 the parent's, 3 ready pipe to the parent.
_READY_FD = 3
_FIRST_SOCKET_FD = 4


def processes_count(value: str) -> int:
    """``--processes``: a positive integer or ``auto`` (the cores this process may run on)."""
    if value == "auto":
        try:
            return max(1, len(os.sched_getaffinity(0)))
        except AttributeError:  # pragma: no cover - not Linux
            return max(1, os.cpu_count() or 1)
    n = int(value)
    if n < 1:
        raise ValueError("--processes must be at least 1 (or auto)")
    return n


@dataclass
class Listener:
    """A socket the parent holds for its workers (``name``: ``http`` or ``pb``)."""

    name: str
    family: int
    sock: socket.socket
    balance: str
    backlog: int

    @property
    def address(self) -> Any:
        return self.sock.getsockname()

    def describe(self) -> dict[str, Any]:
        """What a worker needs to serve it (the descriptor number is given separately)."""
        host, port = self.address[:2]
        return {"family": int(self.family), "balance": self.balance, "backlog": self.backlog,
                "host": host, "port": port}


def bind_listener(reactor: Any, name: str, description: str, balance: str) -> Listener:
    """Bind ``description`` (a TCP endpoint string) for the workers.

    Only TCP: an adopted UNIX port unlinks its path when any worker stops
    listening, which would take the socket away from the others.
    """
    endpoint = endpoints.serverFromString(reactor, description)
    if not isinstance(endpoint, endpoints.TCP4ServerEndpoint):  # TCP6ServerEndpoint is a subclass
        raise ValueError(f"--processes N>1 serves TCP endpoints only, not {description!r}")
    interface = endpoint._interface  # no public accessors on the endpoint
    family = socket.AF_INET6 if isinstance(endpoint, endpoints.TCP6ServerEndpoint) or ":" in interface \
        else socket.AF_INET
    backlog = endpoint._backlog
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if balance == "reuseport":
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((interface or ("::" if family == socket.AF_INET6 else ""), endpoint._port))
        if balance == "shared":
            sock.listen(backlog)
        sock.setblocking(False)
        sock.set_inheritable(True)
    except OSError as e:
        sock.close()
        raise error.CannotListenError(interface, endpoint._port, e) from None
    return Listener(name, family, sock, balance, backlog)


def adopt_listener(reactor: Any, fd: int, info: dict[str, Any], factory: Any) -> Any:
    """In a worker: the listening port for the parent's socket ``fd`` (see :func:`bind_listener`)."""
    family = socket.AddressFamily(info["family"])
    if info["balance"] == "reuseport":
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((info["host"], info["port"]))
            sock.listen(info["backlog"])
            sock.setblocking(False)
            port = reactor.adoptStreamPort(sock.fileno(), family, factory)
        finally:
            sock.close()  # the port has its own duplicate
        os.close(fd)
        return port
    port = reactor.adoptStreamPort(fd, family, factory)
    os.close(fd)  # adoptStreamPort duplicates the descriptor
    return port


class _Timer:
    """``reactor.callLater(seconds, f, *args)`` that also waits for ``seconds`` on the monotonic clock.

    Twisted's timers follow the wall clock: stepped forward (NTP, a resumed VM), every kill deadline
    and ready timeout would fire at once and kill workers in the middle of a drain or of their start.
    When the wall clock says it is time but the monotonic one does not, the timer waits the rest."""

    def __init__(self, reactor: Any, seconds: float, f: Callable[..., Any], *args: Any,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.reactor, self.f, self.args, self.clock = reactor, f, args, clock
        self.due = clock() + seconds
        self.fired = False
        self.call = reactor.callLater(seconds, self._check)

    def _check(self) -> None:
        left = self.due - self.clock()
        if left > 0:
            self.call = self.reactor.callLater(left, self._check)
        else:
            self.fired = True
            self.f(*self.args)

    def active(self) -> bool:
        return bool(self.call.active())

    def cancel(self) -> None:
        if self.call.active():
            self.call.cancel()


def worker_environment(worker_id: int, workers: int, run_dir: str) -> dict[str, str]:
    return {"IMGSERVER_WORKER_ID": str(worker_id), "IMGSERVER_WORKERS": str(workers),
            "IMGSERVER_RUN_DIR": run_dir}


class _WorkerProtocol(protocol.ProcessProtocol):
    def __init__(self, worker: "_Worker") -> None:
        self.worker = worker

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        if childFD == _READY_FD and b"ready" in data and not self.worker.ready.called:
            self.worker.ready.callback(True)

    def processEnded(self, reason: Failure) -> None:
        self.worker.exited(reason)


@dataclass(eq=False)
class _Worker:
    slot: "_Slot"
    started: float
    ready: defer.Deferred[bool] = field(default_factory=defer.Deferred)  # True: ready; False: exited before
    ended: defer.Deferred[int | None] = field(default_factory=defer.Deferred)
    transport: Any = None
    pid: int | None = None
    retiring: bool = False  # asked to stop: its end is not a failure
    exit_code: int | None = None
    gone: bool = False
    became_ready: bool = False

    def exited(self, reason: Failure) -> None:
        value = reason.value
        self.exit_code = getattr(value, "exitCode", None)
        signal_ = getattr(value, "signal", None)
        if not self.ready.called:
            self.ready.callback(False)
        self.gone = True
        self.slot.supervisor._exited(self, self.exit_code, signal_)
        self.ended.callback(self.exit_code)

    def signal(self, name: str) -> None:
        try:
            self.transport.signalProcess(name)
        except (error.ProcessExitedAlready, OSError):
            pass


@dataclass(eq=False)
class _Slot:
    supervisor: "Supervisor"
    id: int
    worker: _Worker | None = None
    backoff: float = BACKOFF_FIRST
    failures: int = 0
    restarts: int = 0
    ever_ready: bool = False
    pending: Any = None  # the delayed call of a restart


class Supervisor:
    """Starts, watches, restarts and stops the worker processes (the parent's one job)."""

    def __init__(self, reactor: Any, workers: int, argv: Sequence[str], listeners: Sequence[Listener], *,
                 grace: float, run_dir: str, executable: str = sys.executable,
                 on_give_up: Callable[[str], None] | None = None) -> None:
        self.reactor = reactor
        self.argv = list(argv)
        self.listeners = list(listeners)
        self.grace = grace
        self.run_dir = run_dir
        self.executable = executable
        self.slots = [_Slot(self, i) for i in range(workers)]
        self.stopping = False
        self.gave_up: str | None = None
        self.on_give_up = on_give_up
        self._rolling: defer.Deferred[None] | None = None
        #: Every worker process alive, the ones being replaced by a rolling restart included.
        self.live: list[_Worker] = []

    # -- starting ---------------------------------------------------------------

    def _spawn(self, slot: _Slot) -> _Worker | None:
        """Start a worker in ``slot``; None if it could not even be spawned (fork or exec failed:
        counted as a failed start and retried with the slot's back-off, like a worker that died)."""
        sockets = {}
        child_fds: dict[int, Any] = {0: "w", 1: 1, 2: 2, _READY_FD: "r"}
        for n, listener in enumerate(self.listeners):
            fd = _FIRST_SOCKET_FD + n
            child_fds[fd] = listener.sock.fileno()
            sockets[listener.name] = {"fd": fd, **listener.describe()}
        env = {**os.environ, **worker_environment(slot.id, len(self.slots), self.run_dir)}
        # The workers import this very imgserver, whatever their working directory holds.
        here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env["PYTHONPATH"] = os.pathsep.join([here, *filter(None, [os.environ.get("PYTHONPATH")])])
        args = [self.executable, "-m", "imgserver", *self.argv, "--worker-sockets", json.dumps(sockets)]
        worker = _Worker(slot, self.reactor.seconds())
        try:
            worker.transport = self.reactor.spawnProcess(_WorkerProtocol(worker), self.executable, args, env=env,
                                                         childFDs=child_fds)
        except Exception as e:  # OSError (EAGAIN, EMFILE, ENOMEM, ...) from fork or the pipes
            self._start_failed(slot, None, None, None, f"could not be spawned: {e}")
            return None
        worker.pid = worker.transport.pid
        slot.worker = worker
        self.live.append(worker)
        worker.ready.addCallback(lambda ok: (self._ready(worker) if ok else None, ok)[1])
        log.info("worker {id} started (pid {pid})", id=slot.id, pid=worker.pid)
        self._write_state()
        timeout = _Timer(self.reactor, READY_TIMEOUT, self._not_ready, worker)

        def no_timeout(result: Any) -> Any:
            timeout.cancel()
            return result

        worker.ready.addBoth(no_timeout)
        return worker

    def _ready(self, worker: _Worker) -> None:
        worker.became_ready = True
        worker.slot.ever_ready = True
        worker.slot.failures = 0
        log.info("worker {id} ready (pid {pid})", id=worker.slot.id, pid=worker.pid)

    def _not_ready(self, worker: _Worker) -> None:
        log.error("worker {id} (pid {pid}) not ready after {t} s: killing it", id=worker.slot.id,
                  pid=worker.pid, t=READY_TIMEOUT)
        worker.signal("KILL")

    async def start(self) -> None:
        """Start every worker; returns once each has been ready (fails if the parent gave up)."""
        for slot in self.slots:
            self._spawn(slot)
        while not self.stopping and not self.gave_up:
            if all(s.ever_ready for s in self.slots):
                break
            await task.deferLater(self.reactor, 0.05, lambda: None)
        if self.gave_up:
            raise RuntimeError(self.gave_up)

    # -- deaths and restarts ------------------------------------------------------

    def _exited(self, worker: _Worker, code: int | None, signal_: int | None) -> None:
        slot = worker.slot
        if worker in self.live:
            self.live.remove(worker)
        if worker.retiring or self.stopping:
            log.info("worker {id} (pid {pid}) exited (status {code})", id=slot.id, pid=worker.pid, code=code)
            if slot.worker is worker:
                slot.worker = None
            self._write_state()
            return
        if slot.worker is not worker:  # pragma: no cover - an old worker not retired
            return
        slot.worker = None
        slot.restarts += 1
        self._forget_snapshot(slot.id)
        lived = self.reactor.seconds() - worker.started
        if not worker.became_ready:
            slot.failures += 1
        if lived >= BACKOFF_RESET_AFTER:
            slot.backoff = BACKOFF_FIRST
        self._schedule_restart(slot, worker.pid, code, signal_,
                               f"died (status {code}, signal {signal_}) after {lived:.1f} s")

    def _start_failed(self, slot: _Slot, pid: int | None, code: int | None, signal_: int | None,
                      why: str) -> None:
        slot.failures += 1
        self._schedule_restart(slot, pid, code, signal_, why)

    def _schedule_restart(self, slot: _Slot, pid: int | None, code: int | None, signal_: int | None,
                          why: str) -> None:
        if slot.failures >= MAX_START_FAILURES:
            self._give_up(f"worker {slot.id} could not start {slot.failures} times in a row (last status "
                          f"{code}, signal {signal_}; {why})")
            return
        if slot.pending is not None and slot.pending.active():
            slot.pending.cancel()
        delay, slot.backoff = slot.backoff, min(slot.backoff * 2, BACKOFF_MAX)
        log.warn("worker {id} (pid {pid}) {why}: restarting in {delay:.1f} s", id=slot.id, pid=pid, why=why,
                 delay=delay)
        slot.pending = self.reactor.callLater(delay, self._restart, slot)
        self._write_state()

    def _restart(self, slot: _Slot) -> None:
        slot.pending = None
        if not self.stopping:
            self._spawn(slot)

    def _give_up(self, why: str) -> None:
        log.critical("giving up: {why}", why=why)
        self.gave_up = why
        if self.on_give_up is not None:
            self.on_give_up(why)

    # -- rolling restart ------------------------------------------------------

    def rolling_restart(self) -> defer.Deferred[None]:
        """Replace every worker, one at a time: start the new one, once it is
        ready drain the old one.  A second SIGHUP while one runs is ignored."""
        if self._rolling is None and not self.stopping:
            rolling = self._rolling = defer.Deferred.fromCoroutine(self._roll())
            rolling.addErrback(lambda f: log.failure("rolling restart failed", f))

            def done(_: Any) -> None:
                self._rolling = None

            rolling.addBoth(done)
            return rolling  # (it may have finished already: self._rolling is None again then)
        return defer.succeed(None)

    async def _roll(self) -> None:
        log.info("rolling restart of {n} workers", n=len(self.slots))
        for slot in self.slots:
            if self.stopping:
                return
            old = slot.worker
            if slot.pending is not None:  # waiting to restart anyway: now
                slot.pending.cancel()
                slot.pending = None
            new = self._spawn(slot)
            if new is not None:
                await new.ready
            if self.stopping:  # stop() drains every process, this replacement included
                return
            if new is None or not new.became_ready:
                log.error("worker {id}: its replacement did not start; keeping the old one", id=slot.id)
                if old is not None and not old.gone:
                    if slot.pending is not None:
                        slot.pending.cancel()
                        slot.pending = None
                    slot.worker = old
                continue
            if old is not None and not old.gone:
                await self._retire(old)
        log.info("rolling restart done")

    async def _retire(self, worker: _Worker) -> bool:
        """Drain ``worker`` (SIGTERM) and wait for it: True if it exited in time (else it is killed)."""
        worker.retiring = True
        if worker.ended.called:
            return True
        worker.signal("TERM")
        timer = _Timer(self.reactor, self.grace + EXIT_MARGIN, worker.signal, "KILL")
        await worker.ended
        in_time = timer.active()
        if in_time:
            timer.cancel()
        else:
            log.error("worker {id} (pid {pid}) did not exit within {t} s: killed", id=worker.slot.id,
                      pid=worker.pid, t=self.grace + EXIT_MARGIN)
        return in_time

    # -- stopping ------------------------------------------------------------

    async def stop(self) -> bool:
        """Drain every worker at once; True if all exited within grace + margin."""
        self.stopping = True
        for slot in self.slots:
            if slot.pending is not None:
                slot.pending.cancel()
                slot.pending = None
        workers = list(self.live)  # a worker being replaced by a rolling restart too
        results = await defer.gatherResults([defer.Deferred.fromCoroutine(self._retire(w)) for w in workers])
        return all(results)

    # -- the state the workers read -----------------------------------------------------

    def stats(self) -> dict[str, Any]:
        return {
            "pid": os.getpid(), "time": time.time(), "workers": len(self.slots),
            "pids": {str(s.id): s.worker.pid for s in self.slots if s.worker is not None},
            "restarts": {str(s.id): s.restarts for s in self.slots},
        }

    def _write_state(self) -> None:
        """``RUN_DIR/parent.json`` (tiny, in the parent's private directory: written in place, atomically)."""
        from .cluster import ensure_private_dir

        path = os.path.join(self.run_dir, "parent.json")
        for attempt in (1, 2):
            try:
                with open(path + ".tmp", "w") as f:
                    json.dump(self.stats(), f)
                os.replace(path + ".tmp", path)
                return
            except FileNotFoundError:  # the run dir was removed under us: make it again (private)
                if attempt == 2 or not ensure_private_dir(self.run_dir):
                    log.warn("could not write {path}: its directory is gone or not private", path=path)
                    return
            except OSError as e:  # pragma: no cover - a full disk
                log.warn("could not write {path}: {e}", path=path, e=e)
                return

    def _forget_snapshot(self, worker_id: int) -> None:
        """A dead worker's snapshot is gone at once (not only stale after a few seconds)."""
        try:
            os.unlink(os.path.join(self.run_dir, f"worker-{worker_id}.json"))
        except OSError:
            pass


async def run_parent(reactor: Any, args: Any, argv: Sequence[str]) -> int:
    """The parent of ``imgserver --processes N``: the exit status.

    The workers get the same command line ``argv`` plus ``--worker-sockets``,
    which makes them workers whatever else it says (``--processes``,
    ``--balance``, ``--http`` and ``--pb`` are the parent's business)."""
    listeners: list[Listener] = []
    run_dir = tempfile.mkdtemp(prefix="imgserver-run-")
    os.chmod(run_dir, 0o700)
    try:
        try:
            for name, description in (("http", args.http), ("pb", args.pb)):
                if description and description != "none":
                    listener = bind_listener(reactor, name, description, args.balance)
                    listeners.append(listener)
                    host, port = listener.address[:2]
                    log.info("parent: {name} on {host}:{port} ({balance}) for {n} workers", name=name.upper(),
                             host=host, port=port, balance=args.balance, n=args.processes)
        except (ValueError, error.CannotListenError) as e:
            log.critical("{e}", e=str(e))
            return 2
        running: defer.Deferred[None] = defer.Deferred()
        reactor.callWhenRunning(running.callback, None)
        await running  # the reactor's own signal handlers (SIGCHLD for the workers) are installed by now
        finished: defer.Deferred[int] = defer.Deferred()
        supervisor = Supervisor(reactor, args.processes, argv, listeners,
                                grace=args.grace, run_dir=run_dir)

        stopping: list[defer.Deferred[int]] = []

        def stop(code_if_clean: int = 0) -> None:
            if stopping:
                return

            async def drain() -> int:
                log.info("parent: draining {n} workers (grace {g} s)", n=len(supervisor.slots), g=args.grace)
                clean = await supervisor.stop()
                return code_if_clean if clean else 1

            d = defer.Deferred.fromCoroutine(drain())
            stopping.append(d)
            d.addBoth(finished.callback)

        supervisor.on_give_up = lambda why: stop(1)

        def on_signal(number: int, frame: Any) -> None:
            if number == signal.SIGHUP:
                reactor.callFromThread(supervisor.rolling_restart)
            else:
                reactor.callFromThread(stop)

        previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
        try:
            try:
                await supervisor.start()
            except RuntimeError:
                pass  # gave up: ``stop(1)`` is under way
            if not stopping:
                log.info("parent: {n} workers ready", n=len(supervisor.slots))
            return await finished
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
    finally:
        for listener in listeners:
            listener.sock.close()
        shutil.rmtree(run_dir, ignore_errors=True)
