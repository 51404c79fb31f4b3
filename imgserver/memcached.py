"""The memcached result tier: transformed images shared between machines.

Every machine's imgserver asks the same memcached servers for a result before
processing an image, and offers what it processed.  memcached is an
optimisation, never a dependency, so everything here is bounded and nothing
fails a request:

- a lookup answers within ``timeout`` (default 50 ms) or is a miss (declared
  after one more poll of the reactor, so that an answer already waiting in the
  socket when a busy reactor comes back to the deadline is still taken);
- a write is fire-and-forget, given up after ``put_timeout`` (1 s);
- a server that refuses, drops or stops answering the connection is *down*
  for a back-off (0.5 s doubling to 30 s, reset by its next answer): its keys
  miss at once meanwhile (they are not moved to another server: every machine
  keeps mapping a key to the same server), then a new connection is tried;
- a hung server cannot grow a queue: at most ``max_outstanding`` operations
  (and ``max_pending_bytes`` of values) wait on one connection, beyond that
  an operation misses / declines at once;
- a value that is not a whole record for the key asked for (another client's
  value, a truncated one) is a miss (counted ``corrupt``);
- results larger than memcached's item size (``max_item_bytes`` less 1 KiB
  for its own item header) are not sent (counted ``too_large``).

Keys are ``b"imgs:" + ResultKey.shared_digest().hex()`` spread over the
servers by consistent hashing (ketama-style: 160 points per server on an md5 ring),
so adding or removing a server moves only about 1/N of the keys, and all
machines configured with the same servers agree on where a key lives.

The wire protocol is Twisted's own :class:`~twisted.protocols.memcache.MemCacheProtocol`,
one connection per server, commands pipelined.  Answers come back in order
and a sent command cannot be taken back, so a lookup that gives up at its
deadline leaves its command on the connection: the answer, when it comes, is
dropped, and the command counts against ``max_outstanding`` until then.  The
protocol's own ``persistentTimeOut`` (here ``put_timeout``, 1 s) is what detects a
hung server: when a connection with commands waiting receives nothing for
that long, every waiting command fails and the connection is aborted (not
closed gracefully, which would wait forever for a hung server to read what
was written), which marks the server down.  Being one ordered stream, a
large write ahead of a lookup on the same server delays it (within the
lookup's deadline still).
"""

from __future__ import annotations

import bisect
import hashlib
import struct
from typing import Any, Callable, Iterable

from twisted.internet import defer
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint, connectProtocol
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import connectionDone
from twisted.protocols.memcache import MemCacheProtocol
from twisted.python.failure import Failure
from zope.interface import implementer

from . import record
from .processing import Result
from .record import ResultKey
from .tiers import IResultTier

__all__ = ["MemcachedTier", "HashRing", "memcached_key", "KEY_PREFIX"]

#: Prefix of every key this tier stores (so that a shared memcached can be inspected or flushed by prefix).
KEY_PREFIX = b"imgs:"
#: Room left for memcached's own item header (key, flags, CAS) under its item size limit.
ITEM_OVERHEAD = 1024
#: Ring points per server (ketama uses 160: 40 md5 digests of 4 points each).
POINTS_PER_SERVER = 160
#: Back-off of a server that failed: first, then doubling up to the maximum.
BACKOFF_FIRST = 0.5
BACKOFF_MAX = 30.0

_POINT = struct.Struct("<I")


def memcached_key(key: ResultKey) -> bytes:
    """The memcached key of ``key``'s result (ASCII, 37 bytes: well under memcached's 250)."""
    return KEY_PREFIX + key.shared_digest().hex().encode("ascii")


class HashRing:
    """Consistent hashing (ketama-style) of keys onto servers.

    Each server ``"host:port"`` gets ``POINTS_PER_SERVER`` points on a 32-bit
    ring from the md5 of ``"host:port-i"``; a key belongs to the first point at
    or after the first 4 bytes (little-endian) of its md5.  Deterministic, so
    every process and machine with the same server list agrees.
    """

    def __init__(self, servers: Iterable[tuple[str, int]]) -> None:
        self.servers = tuple(servers)
        if not self.servers:
            raise ValueError("a hash ring needs at least one server")
        points: list[tuple[int, int]] = []
        for index, (host, port) in enumerate(self.servers):
            name = _server_name(host, port)
            for i in range(POINTS_PER_SERVER // 4):
                digest = hashlib.md5(f"{name}-{i}".encode()).digest()
                points.extend((_POINT.unpack_from(digest, 4 * j)[0], index) for j in range(4))
        points.sort()
        self._hashes = [h for h, _ in points]
        self._owners = [i for _, i in points]

    def index(self, key: bytes) -> int:
        """Index (in ``servers``) of the server that holds ``key``."""
        h = _POINT.unpack_from(hashlib.md5(key).digest())[0]
        i = bisect.bisect_left(self._hashes, h)
        return self._owners[i if i < len(self._hashes) else 0]

    def server(self, key: bytes) -> tuple[str, int]:
        return self.servers[self.index(key)]


def _server_name(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _endpoint(reactor: Any, host: str, port: int, timeout: float) -> Any:
    """A client endpoint; IP addresses are used as they are (no resolver thread hop per reconnect)."""
    if isIPAddress(host):
        return TCP4ClientEndpoint(reactor, host, port, timeout=timeout)
    if isIPv6Address(host):
        return TCP6ClientEndpoint(reactor, host, port, timeout=timeout)
    return HostnameEndpoint(reactor, host, port, timeout=timeout)


class _Protocol(MemCacheProtocol):
    """MemCacheProtocol that tells its server when it is lost, and aborts
    (rather than closes) a connection whose server stopped answering."""

    def __init__(self, server: _Server, timeout: float) -> None:
        super().__init__(timeOut=timeout)
        self.server = server
        self.lost: defer.Deferred[None] = defer.Deferred()
        self.callLater = server.tier.clock.callLater  # TimeoutMixin's timer, on the tier's clock

    def waiting(self) -> int:
        """Commands sent and not answered yet."""
        return len(self._current)

    def timeoutConnection(self) -> None:
        # The base class calls loseConnection(), which waits until everything
        # written is sent: never, if the server is hung and our buffers are full.
        self.server.failed(self, "no answer within %.3g s" % self.persistentTimeOut)
        self._cancelCommands(defer.TimeoutError("memcached did not answer in time"))
        self.transport.abortConnection()

    def lineReceived(self, line: bytes) -> None:
        self.server.answered()
        super().lineReceived(line)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        # MemCacheProtocol leaves its no-answer timer armed: it would fire into
        # this dead connection up to ``persistentTimeOut`` later.
        self.setTimeout(None)
        super().connectionLost(reason)
        self.server.lost_connection(self, reason)
        self.lost.callback(None)


class _Server:
    """One memcached server: its connection (made lazily), its down/back-off state."""

    def __init__(self, tier: MemcachedTier, host: str, port: int) -> None:
        self.tier = tier
        self.host, self.port = host, port
        self.name = _server_name(host, port)
        self.proto: _Protocol | None = None
        self.connecting: defer.Deferred[Any] | None = None
        self.waiters: list[defer.Deferred[_Protocol]] = []
        self.down_until = 0.0
        self.backoff = BACKOFF_FIRST
        self.failures = 0
        self.last_error: str | None = None
        #: Bytes of values written (or about to be) and not answered yet.
        self.pending_bytes = 0
        #: Connections aborted whose loss has not been reported yet (close() waits for them).
        self.dying: set[_Protocol] = set()

    def is_down(self) -> bool:
        return self.tier.clock.seconds() < self.down_until

    def busy(self, size: int) -> bool:
        """Whether one more operation (holding ``size`` bytes) would pass the caps on
        operations waiting and on bytes waiting (one write is always allowed)."""
        waiting = len(self.waiters) + (self.proto.waiting() if self.proto is not None else 0)
        if waiting >= self.tier.max_outstanding:
            return True
        return size > 0 and self.pending_bytes > 0 and self.pending_bytes + size > self.tier.max_pending_bytes

    def connection(self) -> defer.Deferred[_Protocol]:
        """The connected protocol, now or once connected; fails if the connection fails.
        Cancelling the returned Deferred only withdraws this caller."""
        if self.proto is not None:
            return defer.succeed(self.proto)
        waiter: defer.Deferred[_Protocol] = defer.Deferred(self._withdraw)
        self.waiters.append(waiter)
        if self.connecting is None:
            self._connect()
        return waiter

    def _withdraw(self, waiter: defer.Deferred[_Protocol]) -> None:
        if waiter in self.waiters:
            self.waiters.remove(waiter)

    def _connect(self) -> None:
        tier = self.tier
        tier._counters["connects"] += 1
        endpoint = _endpoint(tier.reactor, self.host, self.port, tier.connect_timeout)
        proto = _Protocol(self, max(tier.put_timeout, tier.timeout))
        d = connectProtocol(endpoint, proto)
        self.connecting = d

        def connected(p: _Protocol) -> None:
            self.connecting = None
            if tier.closed:
                p.transport.abortConnection()
                return
            self.proto = p
            waiters, self.waiters = self.waiters, []
            for waiter in waiters:
                waiter.callback(p)

        def not_connected(failure: Failure) -> None:
            self.connecting = None
            reason = failure.getErrorMessage() if not failure.check(defer.CancelledError) else "closed"
            if not tier.closed:
                self.mark_down(f"cannot connect: {reason}")
            waiters, self.waiters = self.waiters, []
            for waiter in waiters:
                waiter.errback(ConnectionError(f"memcached {self.name}: {reason}"))

        d.addCallbacks(connected, not_connected)

    def answered(self) -> None:
        """The server answered: it is healthy, the next failure starts a fresh back-off."""
        self.backoff = BACKOFF_FIRST

    def failed(self, proto: _Protocol, why: str) -> None:
        """``proto``'s server stopped answering; the caller aborts the connection."""
        if proto is not self.proto:
            return
        self.proto = None
        self.dying.add(proto)
        if not self.tier.closed:
            self.mark_down(why)

    def lost_connection(self, proto: _Protocol, reason: Failure) -> None:
        self.dying.discard(proto)
        if proto is not self.proto:
            return
        self.proto = None
        if not self.tier.closed:
            self.mark_down(f"connection lost: {reason.getErrorMessage()}")

    def mark_down(self, why: str) -> None:
        """No operation for this server until the back-off passes; the next one reconnects."""
        if self.is_down():
            return
        self.failures += 1
        self.last_error = why
        self.down_until = self.tier.clock.seconds() + self.backoff
        self.backoff = min(self.backoff * 2, BACKOFF_MAX)

    def close(self) -> defer.Deferred[None]:
        waiters, self.waiters = self.waiters, []
        for waiter in waiters:
            waiter.errback(ConnectionError("the memcached tier is closed"))
        if self.connecting is not None:
            self.connecting.cancel()
        protos = set(self.dying)
        if self.proto is not None:
            protos.add(self.proto)
            self.proto.transport.abortConnection()
        self.proto = None
        return defer.gatherResults([p.lost for p in protos]).addCallback(lambda _: None)


@implementer(IResultTier)
class MemcachedTier:
    """Results kept in memcached, shared by every machine using the same servers.

    ``servers``: ((host, port), ...) (``Settings.memcached_servers``);
    ``timeout``: how long a lookup may take (then it is a miss);
    ``max_item_bytes``: memcached's item size limit (its ``-I``);
    ``put_timeout``: how long a write may take, and how long a connection with
    commands waiting may stay silent before the server is taken as hung (or
    ``timeout`` if longer);
    ``max_outstanding``: operations allowed to wait on one server, and
    ``max_pending_bytes``: bytes of values to write allowed to wait on it (so a
    hung server holds at most that much memory of ours);
    ``expire``: memcached's expiry time of the values written (0: none, LRU only);
    ``clock``: for deadlines and back-off (defaults to ``reactor``).

    Stats: ``hits``, ``misses`` (every lookup that was not a hit, whatever the
    reason), of which ``timeouts``, ``errors`` (connection failed or lost, a
    server error), ``corrupt``, ``down_skips`` (server down) and ``busy`` (too
    many operations or bytes waiting); ``stored``, ``declined`` (every write not
    stored, including ``too_large``); ``connects``: connections made.  Gauges:
    ``servers``, ``down`` (servers down now), ``connected``, ``waiting``
    (operations waiting for an answer), ``pending_bytes``.
    """

    name = "memcached"

    def __init__(self, reactor: Any, servers: Iterable[tuple[str, int]], *, timeout: float = 0.05,
                 max_item_bytes: int = 1024 * 1024, clock: IReactorTime | None = None, put_timeout: float = 1.0,
                 connect_timeout: float = 1.0, max_outstanding: int = 64, max_pending_bytes: int = 16 * 1024 * 1024,
                 expire: int = 0) -> None:
        self.reactor = reactor
        self.clock: IReactorTime = clock if clock is not None else reactor
        self.ring = HashRing(servers)
        self.timeout = timeout
        self.max_item_bytes = max_item_bytes
        self.max_value_bytes = max_item_bytes - ITEM_OVERHEAD
        self.put_timeout = put_timeout
        self.connect_timeout = connect_timeout
        self.max_outstanding = max_outstanding
        self.max_pending_bytes = max_pending_bytes
        self.expire = expire
        self.closed = False
        self._servers = [_Server(self, host, port) for host, port in self.ring.servers]
        self._pending: set[defer.Deferred[Any]] = set()
        self._counters = dict.fromkeys(
            ("hits", "misses", "timeouts", "errors", "corrupt", "down_skips", "busy", "stored", "declined",
             "too_large", "connects"), 0)

    @classmethod
    def from_settings(cls, reactor: Any, settings: Any, clock: IReactorTime | None = None) -> MemcachedTier:
        """The tier ``Settings`` describe (``memcached_servers``, ``memcached_timeout``, ``memcached_max_item_kb``)."""
        return cls(reactor, settings.memcached_servers, timeout=settings.memcached_timeout,
                   max_item_bytes=settings.memcached_max_item_kb * 1024, clock=clock)

    # -- IResultTier ---------------------------------------------------------------------------------------------

    def get(self, key: ResultKey) -> defer.Deferred[Result | None]:
        """The result memcached holds for ``key``, or None; within ``timeout``."""
        digest = key.shared_digest()
        mkey = memcached_key(key)

        def decode(answer: Any) -> Result | None:
            _flags, value = answer
            if value is None:
                return None
            try:
                return record.decode(value, digest)
            except record.CorruptRecord:
                self._counters["corrupt"] += 1
                return None

        def done(result: Result | None) -> Result | None:
            self._count("hits" if result is not None else "misses")
            return result

        d = self._operation(mkey, lambda proto: proto.get(mkey), decode, self.timeout, None)
        return d.addCallback(done)

    def put(self, key: ResultKey, result: Result) -> defer.Deferred[bool]:
        """Offer ``result`` to memcached: fires with whether it was stored, within ``put_timeout``."""
        if len(result.body) > self.max_value_bytes:  # cheap check before encoding
            self._count("too_large", "declined")
            return defer.succeed(False)
        try:
            value = record.encode(key.shared_digest(), result)
        except Exception:  # noqa: BLE001 - a result its record cannot hold: declined, never raised
            self._count("errors", "declined")
            return defer.succeed(False)
        if len(value) > self.max_value_bytes:
            self._count("too_large", "declined")
            return defer.succeed(False)
        mkey = memcached_key(key)

        def done(stored: bool) -> bool:
            self._count("stored" if stored else "declined")
            return stored

        d = self._operation(mkey, lambda proto: proto.set(mkey, value, expireTime=self.expire), bool,
                            self.put_timeout, False, size=len(value))
        return d.addCallback(done)

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(self._counters)
        out["servers"] = len(self._servers)
        out["down"] = sum(1 for s in self._servers if s.is_down())
        out["connected"] = sum(1 for s in self._servers if s.proto is not None)
        out["waiting"] = sum(len(s.waiters) + (s.proto.waiting() if s.proto else 0) for s in self._servers)
        out["pending_bytes"] = sum(s.pending_bytes for s in self._servers)
        return out

    def server_states(self) -> list[dict[str, Any]]:
        """Per server: address, connected, down (and why), failures (for /healthz or logs)."""
        return [{"server": s.name, "connected": s.proto is not None, "down": s.is_down(),
                 "failures": s.failures, "last_error": s.last_error} for s in self._servers]

    def close(self) -> defer.Deferred[None]:
        """Operations in flight end (lookups miss, writes decline), connections are
        aborted; later calls miss / decline.  Fires once every connection is gone."""
        if self.closed:
            return defer.succeed(None)
        self.closed = True
        for d in list(self._pending):
            d.cancel()  # fires it with its default (None / False), see _operation
        lost = [server.close() for server in self._servers]
        return defer.gatherResults(lost, consumeErrors=True).addBoth(lambda _: None)

    # -- internals -----------------------------------------------------------------------------------------------

    def server_for(self, key: ResultKey) -> tuple[str, int]:
        """(host, port) of the server holding ``key``'s result."""
        return self.ring.server(memcached_key(key))

    def _count(self, *names: str) -> None:
        for name in names:
            self._counters[name] += 1

    def _operation(self, mkey: bytes, send: Callable[[_Protocol], defer.Deferred[Any]],
                   convert: Callable[[Any], Any], timeout: float, default: Any,
                   size: int = 0) -> defer.Deferred[Any]:
        """Run one command on ``mkey``'s server: fires with ``convert(answer)``, or
        ``default`` on any failure or after ``timeout`` s; never fails.  Cancelling
        it by the caller fires CancelledError; by :meth:`close`, ``default``.
        ``size``: bytes the command holds (a value to write) until it is answered."""
        if self.closed:
            return defer.succeed(default)
        server = self._servers[self.ring.index(mkey)]
        if server.is_down():
            self._counters["down_skips"] += 1
            return defer.succeed(default)
        if server.busy(size):
            self._counters["busy"] += 1
            return defer.succeed(default)

        finished = sent = released = False
        timer: Any = None
        waiter: defer.Deferred[_Protocol] | None = None
        server.pending_bytes += size

        def release(passthrough: Any = None) -> Any:
            nonlocal released
            if not released:
                released = True
                server.pending_bytes -= size
            return passthrough

        def stop() -> None:
            """No longer waiting for this operation (its command, if sent, is answered and dropped)."""
            nonlocal finished
            finished = True
            self._pending.discard(result)
            if timer is not None and timer.active():
                timer.cancel()
            if waiter is not None and not waiter.called:
                waiter.cancel()  # still connecting: withdraw
            if not sent:
                release()

        def finish(value: Any) -> None:
            if not finished:
                stop()
                result.callback(value)

        def cancel(d: defer.Deferred[Any]) -> None:
            if self.closed:
                finish(default)  # close() ends operations with their default
            else:
                stop()  # the caller gave up: the Deferred fails with CancelledError

        result: defer.Deferred[Any] = defer.Deferred(cancel)
        self._pending.add(result)

        def expire() -> None:
            # An answer already in the socket is read before the miss is declared: timed calls
            # run before I/O in a reactor iteration, and this one runs after the next poll.
            nonlocal timer
            timer = None
            if not finished:
                timer = self.clock.callLater(0, expired)

        def expired() -> None:
            if not finished:
                self._counters["timeouts"] += 1
                finish(default)

        timer = self.clock.callLater(timeout, expire)

        def answer(value: Any) -> None:
            if finished:
                return
            try:
                converted = convert(value)
            except Exception:  # noqa: BLE001 - a bad answer is a miss, never an error for the request
                self._counters["errors"] += 1
                converted = default
            finish(converted)

        def failed(failure: Failure) -> None:
            if finished:
                return
            self._counters["timeouts" if failure.check(defer.TimeoutError) else "errors"] += 1
            finish(default)

        def on_connection(proto: _Protocol) -> None:
            nonlocal sent
            if finished:
                return
            sent = True
            # The protocol's Deferred is never cancelled (it has no canceller, and its answer
            # still has to be read off the connection): a late answer is dropped by answer().
            send(proto).addBoth(release).addCallbacks(answer, failed)

        waiter = server.connection()
        waiter.addCallbacks(on_connection, lambda f: None if f.check(defer.CancelledError) else failed(f))
        return result
