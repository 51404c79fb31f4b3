"""One view of every worker of ``imgserver --processes N``: metrics and health.

Each worker publishes, every :data:`PUBLISH_INTERVAL` seconds,
``RUN_DIR/worker-<id>.json`` (written atomically with asyncfile, no fsync:
a crash leaves the previous snapshot or none): its id, pid, wall time, its
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
worker is missing, stale or degraded, with the list of workers.  What another
worker says is up to about two intervals old (its publishing plus our reading).
With one process there is no cluster view and nothing changes.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Callable, Iterable

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample
from twisted.internet import defer, task
from twisted.logger import Logger

__all__ = ["ClusterView", "PUBLISH_INTERVAL", "STALE_AFTER", "from_environment", "merge_expositions"]

log = Logger(namespace="imgserver.cluster")

PUBLISH_INTERVAL = 1.0
#: A snapshot older than this (seconds, by its wall time) is stale: the worker is hung or gone.
STALE_AFTER = 3.0
_MAX_SNAPSHOT = 4 * 1024 * 1024


class _Families:
    """Hands ready-made metric families to ``generate_latest``."""

    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> list[Metric]:
        return self.families


def merge_expositions(texts: Iterable[tuple[str, str]], extra: Iterable[Metric] = ()) -> bytes:
    """One exposition of many: ``texts`` are ``(worker_id, exposition text)``;
    every sample gets ``worker="<id>"`` and families of the same name are merged."""
    merged: dict[str, Metric] = {}
    for worker, text in texts:
        for family in text_string_to_metric_families(text):
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


class ClusterView:
    """This worker's snapshots out, the other workers' in; see the module doc."""

    def __init__(self, reactor: Any, run_dir: str, worker_id: int, workers: int, *,
                 render: Callable[[], bytes], health: Callable[[], dict[str, Any]],
                 interval: float = PUBLISH_INTERVAL, stale_after: float = STALE_AFTER,
                 wall: Callable[[], float] = time.time) -> None:
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

    def abandon(self) -> None:
        """The parent is gone (killed: it could not clean up): remove this
        worker's snapshot and the parent's state, and the run directory once
        empty (the last worker out succeeds).  Called as the worker exits;
        a few unlinks in a private directory."""
        for name in (f"worker-{self.worker_id}.json", "parent.json"):
            try:
                os.unlink(os.path.join(self.run_dir, name))
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
        own = {"id": self.worker_id, "pid": os.getpid(), "time": self.wall(), "health": self.health_own(),
               "metrics": self.render_own().decode("utf-8")}
        try:
            await self.loader.write(self.path(self.worker_id), json.dumps(own).encode(), atomic=True,
                                    fsync=False, mode=0o600)
            self.published += 1
        except OSError as e:
            self.errors += 1
            log.warn("cluster view: could not publish {path}: {e}", path=self.path(self.worker_id), e=e)
        for other in range(self.workers):
            if other != self.worker_id:
                snapshot = await self._read(self.path(other))
                if snapshot is None:
                    self.snapshots.pop(other, None)
                else:
                    self.snapshots[other] = snapshot
        self.parent = await self._read(os.path.join(self.run_dir, "parent.json")) or {}

    async def _read(self, path: str) -> dict[str, Any] | None:
        try:
            data = await self.loader.load(path, 0, _MAX_SNAPSHOT)
            value = json.loads(data)
        except (OSError, ValueError):
            return None  # missing (not written yet, or the worker died) or unreadable: no snapshot
        return value if isinstance(value, dict) else None

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
            age = max(0.0, now - float(snapshot.get("time", 0)))
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
        texts = [(str(self.worker_id), own.decode("utf-8"))]
        up = Metric("imgserver_worker_up", "1 while the worker's snapshot is fresh", "gauge")
        age = Metric("imgserver_worker_snapshot_age_seconds", "Age of the worker's last snapshot", "gauge")
        up.add_sample("imgserver_worker_up", {"worker": str(self.worker_id)}, 1.0)
        age.add_sample("imgserver_worker_snapshot_age_seconds", {"worker": str(self.worker_id)}, 0.0)
        for other, (status, snapshot, seconds) in sorted(others.items()):
            fresh = snapshot is not None
            up.add_sample("imgserver_worker_up", {"worker": str(other)}, 1.0 if fresh else 0.0)
            if seconds is not None:
                age.add_sample("imgserver_worker_snapshot_age_seconds", {"worker": str(other)}, seconds)
            if fresh:
                texts.append((str(other), str(snapshot.get("metrics", ""))))  # type: ignore[union-attr]
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
        return merge_expositions(texts, extra)


def from_environment(reactor: Any, *, render: Callable[[], bytes],
                     health: Callable[[], dict[str, Any]]) -> ClusterView | None:
    """The cluster view of a worker started by the parent (its ``IMGSERVER_*`` variables), else None."""
    run_dir = os.environ.get("IMGSERVER_RUN_DIR")
    if not run_dir or "IMGSERVER_WORKER_ID" not in os.environ:
        return None
    return ClusterView(reactor, run_dir, int(os.environ["IMGSERVER_WORKER_ID"]),
                       int(os.environ.get("IMGSERVER_WORKERS", "1")), render=render, health=health)
