"""One view of every worker of ``imgserver --processes N``: metrics and health.

Each worker publishes, every :data:`PUBLISH_INTERVAL` seconds,
``RUN_DIR/worker-<id>.json`` (written atomically with asyncfile, no fsync:
a crash leaves the previous snapshot or none): its id, pid, wall and monotonic
time (ages are measured on the monotonic clock: a wall clock stepped back
cannot make a hung worker look fresh), its
own health dict (reactor lag included) and its Prometheus exposition text.
In the same loop it reads the other workers' snapshots and the parent's
``parent.json`` (restart counts) off the reactor thread, through a small
:class:`asyncfile.FileLoader` of its own.

Any worker then answers for all: ``/metrics`` is its own live metrics plus
the others' fresh snapshots (at most :data:`STALE_AFTER` seconds old), every
sample labelled ``worker="<id>"``, plus ``imgserver_processes{state=
"expected|up"}``, ``imgserver_worker_up``, ``imgserver_worker_snapshot_age_seconds``
and ``imgserver_worker_restarts_total`` (``imgserver_reactor_lag_seconds`` is
per worker through its label).  ``/healthz`` is ``degraded`` (503) when any
worker is missing, stale or degraded, with the list of workers.  A snapshot
that is not what this module writes (foreign, corrupt, metrics that do not
parse) counts as missing: it never breaks ``/metrics`` or ``/healthz``.  What another
worker says is up to about two intervals old (its publishing plus our reading).
A worker removes its own snapshot as it exits; a removed run directory is
made again (mode 0700; one someone else made in its place is not used).
With one process there is no cluster view and nothing changes.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import time
from typing import Any, Callable, Iterable

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample
from twisted.internet import defer, task, threads
from twisted.logger import Logger

__all__ = ["ClusterView", "PUBLISH_INTERVAL", "STALE_AFTER", "ensure_private_dir", "from_environment",
           "merge_expositions"]

log = Logger(namespace="imgserver.cluster")

PUBLISH_INTERVAL = 1.0
#: A snapshot older than this (seconds, on the monotonic clock) is stale: the worker is hung or gone.
STALE_AFTER = 3.0
_MAX_SNAPSHOT = 4 * 1024 * 1024


class _Families:
    """Hands ready-made metric families to ``generate_latest``."""

    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> list[Metric]:
        return self.families


def _parse(text: str) -> list[Metric] | None:
    """The families of an exposition text, None if it does not parse."""
    try:
        return list(text_string_to_metric_families(text))
    except Exception:  # the parser raises ValueError, IndexError, ... on malformed text
        return None


def _merge(parsed: Iterable[tuple[str, list[Metric]]], extra: Iterable[Metric] = ()) -> bytes:
    merged: dict[str, Metric] = {}
    for worker, families in parsed:
        for family in families:
            into = merged.get(family.name)
            if into is None:
                into = merged[family.name] = Metric(family.name, family.documentation, family.type, family.unit)
            for sample in family.samples:
                into.samples.append(Sample(sample.name, {**sample.labels, "worker": worker}, sample.value,
                                           sample.timestamp, sample.exemplar))
    families = list(merged.values()) + list(extra)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(families))  # type: ignore[arg-type]
    return generate_latest(registry)


def merge_expositions(texts: Iterable[tuple[str, str]], extra: Iterable[Metric] = ()) -> bytes:
    """One exposition of many: ``texts`` are ``(worker_id, exposition text)``;
    every sample gets ``worker="<id>"`` and families of the same name are merged
    (a text that does not parse is left out)."""
    return _merge(((w, _parse(t) or []) for w, t in texts), extra)


def ensure_private_dir(path: str) -> bool:
    """``path`` is (made, if missing) a directory of this user that nobody else may use: True if so.

    Blocking (two system calls): the run directory removed underneath (a /tmp cleaner, an operator) is
    made again, mode 0700; one that someone else made in its place (a symlink, another owner, open
    to others) is refused: nothing is written into it."""
    try:
        os.mkdir(path, 0o700)
        return True
    except FileExistsError:
        pass
    except OSError as e:
        log.warn("cannot make the run directory {path}: {e}", path=path, e=e)
        return False
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid() and not st.st_mode & 0o077


def _checked(snapshot: dict[str, Any]) -> dict[str, Any] | None:
    """Another worker's snapshot if it has the shape this module writes, else None (counted as
    missing): one corrupt or foreign file must not break ``/metrics`` or ``/healthz`` of every worker."""
    health: Any = snapshot.get("health")
    ok = (isinstance(snapshot.get("time"), (int, float)) and not isinstance(snapshot.get("time"), bool)
          and isinstance(snapshot.get("mono", 0.0), (int, float))
          and isinstance(health, dict) and isinstance(health.get("reasons", []), list)
          and isinstance(health.get("status", "ok"), str)
          and isinstance(snapshot.get("metrics"), str))
    if not ok:
        log.warn("cluster view: ignoring a malformed snapshot of worker {id}", id=snapshot.get("id"))
        return None
    health["reasons"] = [str(r) for r in health.get("reasons", [])]
    return snapshot


class ClusterView:
    """This worker's snapshots out, the other workers' in; see the module doc."""

    def __init__(self, reactor: Any, run_dir: str, worker_id: int, workers: int, *,
                 render: Callable[[], bytes], health: Callable[[], dict[str, Any]],
                 interval: float = PUBLISH_INTERVAL, stale_after: float = STALE_AFTER,
                 wall: Callable[[], float] = time.time, clock: Callable[[], float] = time.monotonic) -> None:
        from asyncfile import FileLoader

        self.reactor = reactor
        self.run_dir = run_dir
        self.worker_id = worker_id
        self.workers = workers
        self.render_own = render
        self.health_own = health
        self.interval = interval
        self.stale_after = stale_after
        self.wall = wall
        #: Ages are measured on the monotonic clock (system-wide on Linux, the same in every worker), so
        #: the wall clock jumping back cannot make a hung worker's last snapshot look fresh.
        self.clock = clock
        # Its own small loader: the service's file counters stay about images.
        self.loader = FileLoader(reactor, max_open=8, max_waiting=64, io_threads=2)
        self.snapshots: dict[int, dict[str, Any]] = {}
        self.parent: dict[str, Any] = {}
        self.published = 0
        self.errors = 0
        self._loop: task.LoopingCall | None = None
        self._tick_d: defer.Deferred[Any] | None = None

    def path(self, worker_id: int) -> str:
        return os.path.join(self.run_dir, f"worker-{worker_id}.json")

    def start(self) -> None:
        if self._loop is None:
            self._loop = task.LoopingCall(self._tick)
            self._loop.clock = self.reactor
            self._loop.start(self.interval, now=True).addErrback(
                lambda f: log.failure("cluster view loop failed", f))

    async def stop(self) -> None:
        """Stop publishing (a draining worker no longer speaks for itself) and close the loader."""
        loop, self._loop = self._loop, None
        if loop is not None and loop.running:
            loop.stop()
        if self._tick_d is not None:
            self._tick_d.cancel()
        await self.loader.close()

    def withdraw(self) -> None:
        """Remove this worker's snapshot as it exits (blocking: run it in a thread), unless it is not
        ours any more (the replacement of a rolling restart publishes under the same name).  A worker
        that exited leaves nothing behind, so the last orphaned worker can remove the run directory
        even when the others exited before the parent was killed."""
        path = self.path(self.worker_id)
        try:
            with open(path, "rb") as f:
                mine = json.loads(f.read(_MAX_SNAPSHOT)).get("pid") == os.getpid()
        except (OSError, ValueError, AttributeError):
            return
        if mine:
            try:
                os.unlink(path)
            except OSError:
                pass

    def abandon(self) -> None:
        """The parent is gone (killed: it could not clean up): remove this
        worker's snapshot and the parent's state, and the run directory once
        empty (the last worker out succeeds).  Called as the worker exits
        (blocking: run it in a thread); a few unlinks in a private directory."""
        self.withdraw()
        try:
            os.unlink(os.path.join(self.run_dir, "parent.json"))
        except OSError:
            pass
        try:
            os.rmdir(self.run_dir)
        except OSError:
            pass  # another worker's snapshot is still there: it removes the directory

    def _tick(self) -> defer.Deferred[Any]:
        self._tick_d = defer.Deferred.fromCoroutine(self._exchange())
        self._tick_d.addErrback(self._failed)
        return self._tick_d

    def _failed(self, failure: Any) -> None:
        if not failure.check(defer.CancelledError):
            self.errors += 1
            log.failure("cluster view: could not exchange snapshots", failure)

    async def _exchange(self) -> None:
        own = {"id": self.worker_id, "pid": os.getpid(), "time": self.wall(), "mono": self.clock(),
               "health": self.health_own(),
               "metrics": self.render_own().decode("utf-8")}
        try:
            await self.loader.write(self.path(self.worker_id), json.dumps(own).encode(), atomic=True,
                                    fsync=False, mode=0o600)
            self.published += 1
        except OSError as e:
            self.errors += 1
            log.warn("cluster view: could not publish {path}: {e}", path=self.path(self.worker_id), e=e)
            if e.errno == errno.ENOENT:  # the run directory was removed underneath: make it again
                if not await threads.deferToThread(ensure_private_dir, self.run_dir):
                    log.error("cluster view: {dir} is not a private directory of this user: not publishing "
                              "there any more", dir=self.run_dir)
                    loop, self._loop = self._loop, None
                    if loop is not None and loop.running:
                        loop.stop()
                    return
        for other in range(self.workers):
            if other != self.worker_id:
                snapshot = await self._read(self.path(other), snapshot=True)
                if snapshot is None:
                    self.snapshots.pop(other, None)
                else:
                    self.snapshots[other] = snapshot
        parent = await self._read(os.path.join(self.run_dir, "parent.json")) or {}
        restarts = parent.get("restarts")
        if not (isinstance(restarts, dict) and all(isinstance(n, (int, float)) for n in restarts.values())):
            parent.pop("restarts", None)
        self.parent = parent

    async def _read(self, path: str, snapshot: bool = False) -> dict[str, Any] | None:
        try:
            data = await self.loader.load(path, 0, _MAX_SNAPSHOT)
            value = json.loads(data)
        except (OSError, ValueError):
            return None  # missing (not written yet, or the worker died) or unreadable: no snapshot
        if not isinstance(value, dict):
            return None
        return _checked(value) if snapshot else value

    # -- the views --------------------------------------------------------------

    def _others(self) -> dict[int, tuple[str, dict[str, Any] | None, float | None]]:
        """Per other worker: status (ok, degraded, stale, missing), fresh snapshot or None, age."""
        now = self.wall()
        out: dict[int, tuple[str, dict[str, Any] | None, float | None]] = {}
        for other in range(self.workers):
            if other == self.worker_id:
                continue
            snapshot = self.snapshots.get(other)
            if snapshot is None:
                out[other] = ("missing", None, None)
                continue
            mono = snapshot.get("mono")
            if isinstance(mono, (int, float)):
                age = max(0.0, self.clock() - mono)
            else:  # pragma: no cover - a snapshot of an older worker: its wall time
                age = max(0.0, now - snapshot["time"])
            if age > self.stale_after:
                out[other] = ("stale", None, age)
            else:
                status = (snapshot.get("health") or {}).get("status", "ok")
                out[other] = ("ok" if status == "ok" else "degraded", snapshot, age)
        return out

    def health(self, own: dict[str, Any]) -> dict[str, Any]:
        """``own`` (this worker's health, already with its status and reasons) for the whole set of workers."""
        entries = [{"worker": self.worker_id, "pid": os.getpid(), "status": own.get("status", "ok"), "age": 0.0,
                    "reactor_lag": own.get("reactor_lag"), "reasons": list(own.get("reasons", ()))}]
        reasons = [f"worker {self.worker_id}: {r}" for r in own.get("reasons", ())]
        for other, (status, snapshot, age) in sorted(self._others().items()):
            theirs = (snapshot or {}).get("health") or {}
            entries.append({"worker": other, "pid": (snapshot or {}).get("pid"), "status": status,
                            "age": None if age is None else round(age, 3),
                            "reactor_lag": theirs.get("reactor_lag"), "reasons": theirs.get("reasons", [])})
            if status in ("missing", "stale"):
                reasons.append(f"worker {other} {status}")
            else:
                reasons += [f"worker {other}: {r}" for r in theirs.get("reasons", ())]
        entries.sort(key=lambda e: e["worker"])
        out = dict(own)
        out["worker"] = self.worker_id
        out["workers"] = entries
        out["workers_expected"] = self.workers
        out["workers_up"] = sum(1 for e in entries if e["status"] in ("ok", "degraded"))
        out["reasons"] = reasons
        out["status"] = "degraded" if reasons else "ok"
        return out

    def render(self, own: bytes) -> bytes:
        """The exposition for every worker: ``own`` (this worker's, live) plus the others' fresh ones."""
        others = self._others()
        texts = [(str(self.worker_id), _parse(own.decode("utf-8")) or [])]
        up = Metric("imgserver_worker_up", "1 while the worker's snapshot is fresh", "gauge")
        age = Metric("imgserver_worker_snapshot_age_seconds", "Age of the worker's last snapshot", "gauge")
        up.add_sample("imgserver_worker_up", {"worker": str(self.worker_id)}, 1.0)
        age.add_sample("imgserver_worker_snapshot_age_seconds", {"worker": str(self.worker_id)}, 0.0)
        for other, (status, snapshot, seconds) in sorted(others.items()):
            families = _parse(snapshot["metrics"]) if snapshot is not None else None
            fresh = families is not None  # a snapshot whose metrics do not parse counts as not up
            up.add_sample("imgserver_worker_up", {"worker": str(other)}, 1.0 if fresh else 0.0)
            if seconds is not None:
                age.add_sample("imgserver_worker_snapshot_age_seconds", {"worker": str(other)}, seconds)
            if fresh:
                texts.append((str(other), families))  # type: ignore[arg-type]
        processes = Metric("imgserver_processes", "Worker processes: expected, and up (fresh snapshot)", "gauge")
        processes.add_sample("imgserver_processes", {"state": "expected"}, float(self.workers))
        processes.add_sample("imgserver_processes", {"state": "up"}, float(len(texts)))
        extra = [processes, up, age]
        restarts = self.parent.get("restarts")
        if isinstance(restarts, dict):
            counter = Metric("imgserver_worker_restarts", "Workers restarted by the parent after dying", "counter")
            for worker, n in sorted(restarts.items()):
                counter.add_sample("imgserver_worker_restarts_total", {"worker": str(worker)}, float(n))
            extra.append(counter)
        return _merge(texts, extra)


def from_environment(reactor: Any, *, render: Callable[[], bytes],
                     health: Callable[[], dict[str, Any]]) -> ClusterView | None:
    """The cluster view of a worker started by the parent (its ``IMGSERVER_*`` variables), else None."""
    run_dir = os.environ.get("IMGSERVER_RUN_DIR")
    if not run_dir or "IMGSERVER_WORKER_ID" not in os.environ:
        return None
    return ClusterView(reactor, run_dir, int(os.environ["IMGSERVER_WORKER_ID"]),
                       int(os.environ.get("IMGSERVER_WORKERS", "1")), render=render, health=health)
