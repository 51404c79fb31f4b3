"""The HTTP face of the image server (twisted.web): a thin shell over ImageService.

    GET|HEAD /images/<path>              the original, streamed (ETag, Last-Modified, 304, Range → 206)
    GET|HEAD /images/<path>?w=&h=&fit=&fm=&q=   a transformed image
    GET      /info/<path>                JSON width, height, format, mode, bytes
    GET      /healthz                    JSON status and load
    GET      /metrics                    Prometheus text format
    GET|HEAD /, /gallery/<dir>, /view/<path>   HTML gallery, only with make_site(gallery=True)
                                         (:mod:`imgserver.gallery`)

Errors are a status and a short JSON body; never a traceback or a path,
always ``Cache-Control: no-store``.  ``timeout`` bounds the wait for an
answer (504), not the transfer of an original.  Every request gets one
access-log line (namespace ``imgserver.access``) and a count in
``imgserver_requests``; one whose client left before the answer started is
logged as 499.  Every answer carries ``X-Content-Type-Options: nosniff``.

Paths are percent-decoded once, here (:func:`imgserver.paths.split_url_path`);
the service gets the decoded path as a ``str``.  With a secret, the signature
covers the endpoint name, that decoded path and the canonical query
(:mod:`imgserver.signing`).

Conditional requests and ranges follow RFC 9110 (:mod:`asyncfile.conditional`):
If-Match / If-Unmodified-Since → 412, If-None-Match / If-Modified-Since →
304, Range (GET only) → 206, past the end → 416 as a JSON error with
``Content-Range: bytes */size``.  The one content negotiation is
``auto=format``: its answers (200 and 304) carry ``Vary: Accept``, and the
format chosen from ``Accept`` is part of the cache key and the ETag; no
other answer depends on a request header but the validators and Range,
which select no representation (RFC 9110 §12.5.5), so they carry no
``Vary``.  There is no content coding.

Bounded cost per connection (:class:`ImageChannel`, checked by one sweep of
every connection a few times a second):

* ``max_connections`` open at once; one more is answered ``503`` with
  ``Retry-After: 1`` and ``Connection: close`` at once, without reading its
  request, and closed within a second (beyond 64 such at once: reset).
* ``header_timeout``: from a connection's start (or a request's first byte)
  to the end of its request line, headers and body; past it ``408`` and close
  (a client sending a byte at a time is dropped).  A body over 64 KiB is
  ``413`` and close (no endpoint takes one).
* ``idle_timeout``: a kept-alive connection with no request in progress is
  closed after it.
* ``send_timeout``: while an answer (or what remains of it in the
  connection's buffer) waits to be sent, the client must accept some bytes at
  least every ``send_timeout`` seconds, else the connection is aborted: its
  producer is stopped and the file descriptor closed.  twisted.web switches
  its own idle timeout off while an answer is produced; this one is what
  frees a stalled reader's place.  A pipelined request is only read once the
  previous answer has left the buffer, so a client that does not read holds
  at most one answer.
"""

from __future__ import annotations

import io
import json
import time
from typing import Any

from twisted.internet import defer, protocol, task
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http, resource, server

from asyncfile import ConsumerStopped, conditional
from asyncfile import Overloaded as QueueFull

from . import paths, signing
from .errors import (BadRequest, ImageServerError, InternalError, NotFound, Overloaded, PreconditionFailed,
                     RangeNotSatisfiable, Timeout, TooLarge, UnsupportedImage, error_body, error_headers,
                     error_status)
from .metrics import LAG_DEGRADED, Metrics, MetricsResource
from .params import parse_transform
from .service import ImageService, write_body

__all__ = ["ImageSite", "ImageChannel", "make_site", "MAX_REQUEST_BODY"]

access_log = Logger(namespace="imgserver.access")
log = Logger(namespace="imgserver.web")

#: Logged (never sent) for a request whose client went away before the answer
#: started: nginx's convention.
CLIENT_CLOSED_REQUEST = 499

#: Largest request body accepted (no endpoint takes one): beyond it 413 and close.
MAX_REQUEST_BODY = 64 * 1024
#: Connections over ``max_connections`` that may wait at once for their client
#: to read the 503 (at most ``REFUSED_LINGER`` seconds each); more are reset.
MAX_REFUSED_LINGERING = 64
REFUSED_LINGER = 1.0
#: Seconds a connection being closed (408, 413, 400, idle) may take to flush
#: its last bytes before it is aborted.
CLOSE_GRACE = 1.0

NOSNIFF = (b"X-Content-Type-Options", b"nosniff")


class RequestTimeout(ImageServerError):
    """The request's line, headers and body took longer than ``header_timeout``."""

    status = 408
    code = "request_timeout"
    default_message = "the request took too long to arrive"


class ImageRequest(server.Request):
    """A request that knows when it started and which endpoint served it, and
    answers the errors twisted.web itself would render as HTML in JSON."""

    def __init__(self, channel: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(channel, *args, **kwargs)
        self.started_at = time.monotonic()
        self.endpoint = "other"
        site = getattr(channel, "site", None)
        self._tracker = site if isinstance(site, ImageSite) else None
        if self._tracker is not None:
            self._tracker.requests.add(self)

    def _ended(self) -> None:
        if self._tracker is not None:
            self._tracker.requests.discard(self)
            self._tracker = None

    def finish(self) -> None:
        super().finish()
        self._ended()

    def process(self) -> None:
        self.setHeader(*NOSNIFF)
        site = getattr(self.channel, "site", None)
        if isinstance(site, ImageSite) and site.stopping:
            self.close_after_answer()  # arrived on a kept-alive connection while stopping
        super().process()

    def gotLength(self, length: int | None) -> None:
        # Never a temporary file for a body (twisted.web spools those over
        # 100 kB to disk): no endpoint takes one, so a small one is kept in
        # memory and a large one refused.
        self.content = io.BytesIO()
        self._body_bytes = 0
        if length is not None and length > MAX_REQUEST_BODY:
            self._refuse_body()

    def handleContentChunk(self, data: bytes) -> None:
        self._body_bytes += len(data)
        if self._body_bytes > MAX_REQUEST_BODY:
            self._refuse_body()
        else:
            self.content.write(data)

    def _refuse_body(self) -> None:
        channel = self.channel
        if isinstance(channel, ImageChannel):
            channel.refuse("body_too_large", 413, b"Content Too Large",
                           TooLarge(f"request bodies over {MAX_REQUEST_BODY} bytes are refused"))
        elif channel is not None and channel.transport is not None:
            channel.transport.abortConnection()

    def close_after_answer(self) -> None:
        """Close the connection once this request is answered (no keep-alive)."""
        if self.channel is not None:
            self.channel.persistent = False
        if not self.startedWriting:
            self.responseHeaders.setRawHeaders(b"Connection", [b"close"])

    def connectionLost(self, reason: Failure) -> None:
        site = getattr(self, "site", None)  # set once the request was complete and dispatched
        if not self.finished and isinstance(site, ImageSite):
            # The client gave up first: still one access-log line (and a count).
            if not self.startedWriting:
                self.code = CLIENT_CLOSED_REQUEST
            site.log(self)
        super().connectionLost(reason)
        self._ended()

    def render(self, resrc: resource.Resource) -> None:
        super().render(_JSONMethodErrors(resrc))

    def processingFailed(self, reason: Failure) -> None:
        log.failure("unexpected error serving {uri}", reason, uri=self.uri.decode("latin-1")[:200])
        _send_error(self, InternalError("internal error"))


class _JSONMethodErrors:
    """Renders ``resrc``; a method it does not support is a JSON 405."""

    def __init__(self, resrc: resource.Resource) -> None:
        self.resrc = resrc

    def render(self, request: Any) -> Any:
        try:
            return self.resrc.render(request)
        except resource.UnsupportedMethod as e:
            allowed = sorted(set(e.allowedMethods) | ({b"HEAD"} if b"GET" in e.allowedMethods else set()))
            request.setHeader(b"Allow", b", ".join(allowed))
            _send_error(request, MethodNotAllowed(f"use {', '.join(m.decode() for m in allowed)}"))
            return server.NOT_DONE_YET


def _raw_answer(status: int, phrase: bytes, err: BaseException) -> bytes:
    """A whole HTTP/1.1 error answer, for a connection that has no request
    object to answer through (refused, timed out, malformed)."""
    body = error_body(err)
    lines = [b"HTTP/1.1 %d %s" % (status, phrase)]
    headers = [*error_headers(err), NOSNIFF, (b"Content-Length", str(len(body)).encode("ascii")),
               (b"Connection", b"close")]
    lines.extend(name + b": " + value for name, value in headers)
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


_WAITING, _RECEIVING, _ANSWERING, _CLOSING = "waiting", "receiving", "answering", "closing"


class ImageChannel(http.HTTPChannel):
    """One HTTP/1.1 connection whose cost is bounded in time (see the module
    docstring): a phase (waiting for a request, receiving one, answering,
    closing) and when it began, and the bytes the kernel has accepted from it
    (``sent``), checked by :meth:`ImageSite.sweep`.  twisted.web's own idle
    timeout is off (the site's ``timeout`` is None): these replace it.
    """

    def __init__(self) -> None:
        super().__init__()
        self.phase = _WAITING
        self.phase_since = 0.0
        self.first_request = True
        #: Bytes written into the socket (accepted by the kernel) so far.
        self.sent = 0
        self._sent_seen = 0
        self.progress_at = 0.0
        #: Why the server closes this connection (None: it does not).
        self.close_reason: str | None = None
        self._done_later: Any = None

    def _now(self) -> float:
        return self.site.reactor.seconds()

    # -- life ------------------------------------------------------------------
    def connectionMade(self) -> None:
        super().connectionMade()
        self.phase_since = self.progress_at = self._now()
        self._count_sent()
        self.site.connected(self)

    def connectionLost(self, reason: Failure) -> None:
        self._done_later = None
        self.site.disconnected(self)
        super().connectionLost(reason)

    def _count_sent(self) -> None:
        """Count what the kernel accepts: wrap this transport's ``writeSomeData``
        (every ``FileDescriptor`` transport: TCP, UNIX).  Elsewhere (TLS) the
        send deadline falls back to how long the transport kept us paused."""
        write_some = getattr(self.transport, "writeSomeData", None)
        if write_some is None:
            return

        def counting(data: Any) -> Any:
            n = write_some(data)
            if type(n) is int and n > 0:
                self.sent += n
            return n

        self.transport.writeSomeData = counting

    def unsent(self) -> int:
        """Bytes waiting in the transport's buffer (0 where it cannot be told)."""
        t = self.transport
        try:
            return len(t.dataBuffer) - t.offset + t._tempDataLen
        except (AttributeError, TypeError):
            return 0

    # -- receiving -------------------------------------------------------------
    def dataReceived(self, data: bytes) -> None:
        if self.close_reason is not None:
            return  # being closed: what the client sends now is dropped
        if self.phase == _WAITING and data:
            self.phase, self.phase_since = _RECEIVING, self._now()
        super().dataReceived(data)

    def lineReceived(self, line: bytes) -> Any:
        if self.close_reason is not None:
            return None
        return super().lineReceived(line)

    def rawDataReceived(self, data: bytes) -> None:
        if self.close_reason is None:
            super().rawDataReceived(data)

    def allContentReceived(self) -> None:
        if self.close_reason is not None:
            return
        now = self._now()
        self.phase, self.phase_since = _ANSWERING, now
        self.progress_at, self._sent_seen = now, self.sent
        super().allContentReceived()

    # -- answering ---------------------------------------------------------------
    def requestDone(self, request: Any) -> None:
        if self.persistent and self._waitingForTransport and self.transport is not None:
            # The answer is still in the buffer: read the next (pipelined)
            # request only once it has left, so a client that does not read
            # holds one answer, not one per request it sends.
            self._done_later = request
            return
        self._request_done(request)

    def _request_done(self, request: Any) -> None:
        self.phase, self.phase_since, self.first_request = _WAITING, self._now(), False
        super().requestDone(request)

    def resumeProducing(self) -> None:
        super().resumeProducing()
        request, self._done_later = self._done_later, None
        if request is not None and self.transport is not None:
            self._request_done(request)

    # -- closing -------------------------------------------------------------------
    def _respondToBadRequestAndDisconnect(self) -> None:
        self.refuse("bad_request", 400, b"Bad Request", BadRequest("malformed HTTP request"))

    def refuse(self, reason: str, status: int, phrase: bytes, err: BaseException) -> None:
        """Answer ``err`` on the bare connection, close it, count ``reason``.
        Once an answer has started, abort instead (nothing can be added)."""
        if self.close_reason is not None or self.transport is None:
            return
        answer_started = any(getattr(r, "startedWriting", False) for r in self.requests)
        if answer_started or (self.phase == _ANSWERING and self.unsent()):
            self.drop(reason)
            return
        self.close_reason = reason
        self.site.metrics.dropped(reason)
        transport = self.transport
        transport.write(_raw_answer(status, phrase, err))
        self.phase, self.phase_since = _CLOSING, self._now()
        # A lingering close: the answer, then end of file; what the client
        # still sends is read and thrown away (closing with unread data would
        # reset the connection, and the client might lose the answer) until it
        # closes or CLOSE_GRACE passes.
        self._networkProducer.unregisterProducer()
        half_close = getattr(transport, "loseWriteConnection", None)
        if half_close is None:
            transport.loseConnection()
            return
        half_close()
        resume = getattr(transport, "resumeProducing", None)
        if resume is not None:
            resume()

    def drop(self, reason: str) -> None:
        """Abort at once: the buffers are thrown away, the descriptor closed,
        and the answer's producer stopped."""
        if self.transport is None:
            return
        if self.close_reason is None:
            self.close_reason = reason
            self.site.metrics.dropped(reason)
        self.phase, self.phase_since = _CLOSING, self._now()
        self.transport.abortConnection()

    def check(self, now: float, settings: Any) -> None:
        """Enforce the deadlines of the current phase (called by the sweep)."""
        if self.transport is None:
            return
        if self.phase == _CLOSING:
            if now - self.phase_since >= CLOSE_GRACE:
                self.transport.abortConnection()
            return
        unsent = self.unsent()
        waiting = self._waitingForTransport
        if self.phase == _ANSWERING or unsent or waiting:
            if self.phase == _WAITING:
                self.phase_since = now  # idle from when the last answer has left, not from its end
            if self.sent != self._sent_seen or not (unsent or waiting):
                # The client took bytes, or nothing waits for it (the answer
                # is still being prepared: ``timeout`` bounds that).
                self._sent_seen, self.progress_at = self.sent, now
            elif now - self.progress_at >= settings.send_timeout:
                self.drop("send_timeout")
            return
        if self.phase == _RECEIVING:
            if now - self.phase_since >= settings.header_timeout:
                self.refuse("header_timeout", 408, b"Request Timeout", RequestTimeout())
        elif self.phase == _WAITING:
            limit = settings.header_timeout if self.first_request else settings.idle_timeout
            if now - self.phase_since >= limit:
                self.close_reason = "idle_timeout"
                self.site.metrics.dropped("idle_timeout")
                self.phase, self.phase_since = _CLOSING, now
                self.loseConnection()


class _Refused(protocol.Protocol):
    """A connection over ``max_connections``: 503 at once, its request is not
    read (what it sends is thrown away), closed when the client closes or
    after ``REFUSED_LINGER`` seconds; reset at once when too many linger."""

    def __init__(self, site: "ImageSite") -> None:
        self.site = site
        self.timer: Any = None

    def connectionMade(self) -> None:
        site = self.site
        site.refused_lingering += 1
        site.metrics.connections_refused.inc()
        if site.refused_lingering > MAX_REFUSED_LINGERING:
            self.transport.abortConnection()
            return
        self.transport.write(_REFUSED_ANSWER)
        half_close = getattr(self.transport, "loseWriteConnection", None)
        if half_close is not None:
            half_close()  # the 503, then end of file: the client sees the whole answer
        else:
            self.transport.loseConnection()
        self.timer = site.reactor.callLater(REFUSED_LINGER, self.transport.abortConnection)

    def dataReceived(self, data: bytes) -> None:
        pass

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self.site.refused_lingering -= 1
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None


_REFUSED_ANSWER = _raw_answer(503, b"Service Unavailable",
                              Overloaded("too many connections; try again shortly", retry_after=1))


class ImageSite(server.Site):
    """The site, which also keeps track of its connections and of the requests
    not yet answered (for a graceful stop), caps the connections and enforces
    their deadlines (see the module docstring)."""

    requestFactory = ImageRequest

    def __init__(self, root: resource.Resource, service: ImageService, metrics: Metrics) -> None:
        super().__init__(root, timeout=None, reactor=service.reactor)
        self.service = service
        self.settings = service.settings
        self.metrics = metrics
        self.displayTracebacks = False
        #: Requests received and not yet finished (or given up by their client).
        self.requests: set[ImageRequest] = set()
        #: Open HTTP connections, busy or idle: channel -> its transport.
        self.channels: dict[Any, Any] = {}
        #: Connections over the cap still being told so.
        self.refused_lingering = 0
        #: Set by drain(): connections are no longer kept alive.
        self.stopping = False
        settings = self.settings
        shortest = min(settings.header_timeout, settings.idle_timeout, settings.send_timeout)
        #: Seconds between two sweeps: deadlines are enforced this late at most.
        self.sweep_interval = max(0.05, min(1.0, shortest / 4))
        self._sweeper: task.LoopingCall | None = None
        metrics.gauge("imgserver_connections", "Open HTTP connections", lambda: len(self.channels))
        metrics.gauge("imgserver_max_connections", "HTTP connections allowed at once",
                      lambda: settings.max_connections)

    def protocol(self) -> ImageChannel:  # what Factory.buildProtocol calls
        return ImageChannel()

    def buildProtocol(self, addr: Any) -> Any:
        if len(self.channels) >= self.settings.max_connections:
            return _Refused(self)
        return super().buildProtocol(addr)

    def startFactory(self) -> None:
        super().startFactory()
        self.metrics.lag.start()

    def stopFactory(self) -> None:
        self.metrics.lag.stop()
        super().stopFactory()

    def connected(self, channel: ImageChannel) -> None:
        self.channels[channel] = channel.transport
        if self._sweeper is None:
            self._sweeper = task.LoopingCall(self.sweep)
            self._sweeper.clock = self.reactor
            self._sweeper.start(self.sweep_interval, now=False)

    def disconnected(self, channel: ImageChannel) -> None:
        self.channels.pop(channel, None)
        if not self.channels and self._sweeper is not None:
            sweeper, self._sweeper = self._sweeper, None
            if sweeper.running:
                sweeper.stop()

    def sweep(self) -> None:
        """Enforce every connection's deadlines."""
        now = self.reactor.seconds()
        settings = self.settings
        for channel in list(self.channels):
            try:
                channel.check(now, settings)
            except Exception:
                log.failure("checking a connection's deadlines")

    def drain(self) -> None:
        """Stop keeping connections alive: idle ones close now (once flushed),
        busy ones right after their answer; requests still arriving on them
        are answered with ``Connection: close``."""
        self.stopping = True
        busy = set()
        for request in list(self.requests):
            if request.channel is not None:
                busy.add(request.channel.transport)
                request.close_after_answer()
        for transport in list(self.channels.values()):
            if transport not in busy:
                transport.loseConnection()

    def close_connections(self, abort: bool = False) -> None:
        """Close every connection: once what it was sent is flushed, or at once (``abort``)."""
        for transport in list(self.channels.values()):
            if abort:
                transport.abortConnection()
            else:
                transport.loseConnection()

    def log(self, request: ImageRequest) -> None:
        """One access-log line per request, through twisted.logger."""
        elapsed = (time.monotonic() - getattr(request, "started_at", time.monotonic())) * 1000
        status = request.code
        self.metrics.count(getattr(request, "endpoint", "other"), status)
        access_log.info(
            "{client} {method} {uri} {status} {bytes} {ms:.1f}ms",
            client=getattr(request.getClientAddress(), "host", None) or "-",  # a UNIX socket has no host
            method=request.method.decode("latin-1"),
            uri=request.uri.decode("latin-1")[:512],
            status=status,
            bytes=request.sentLength,
            ms=elapsed,
        )


class MethodNotAllowed(ImageServerError):
    status = 405
    code = "method_not_allowed"
    default_message = "method not allowed"


#: Headers that describe a representation: an error answer must not carry them.
_REPRESENTATION_HEADERS = (b"etag", b"last-modified", b"accept-ranges", b"content-range", b"content-type")


def _send_error(request: server.Request, err: BaseException) -> None:
    if request.finished or request._disconnected:
        return
    if request.startedWriting:
        # Too late for a status: the client would take the error for the end
        # of the body.  Cut the answer short instead.
        if request.channel is not None:
            request.channel.transport.abortConnection()
        return
    status = error_status(err)
    request.setResponseCode(status)
    for name in _REPRESENTATION_HEADERS:
        request.responseHeaders.removeHeader(name)
    for name, value in error_headers(err):
        request.setHeader(name, value)
    body = error_body(err)
    request.setHeader(b"Content-Length", str(len(body)).encode())
    if request.method != b"HEAD":
        request.write(body)
    request.finish()


class _AsyncResource(resource.Resource):
    """Runs ``handle(request)`` as a coroutine: errors become JSON answers,
    a timeout becomes 504, and a client that goes away cancels the work."""

    isLeaf = True
    endpoint = "other"

    def __init__(self, service: ImageService) -> None:
        super().__init__()
        self.service = service
        self.settings = service.settings

    async def handle(self, request: Any) -> None:
        raise NotImplementedError

    def render_GET(self, request: Any) -> Any:
        request.endpoint = self.endpoint
        request.timed_out = False
        started: list[defer.Deferred[Any]] = []
        timeout = self.settings.timeout
        if timeout:
            # Armed before the handler runs: it may reach its answer (and call
            # _answered) before its first real wait.
            request.answer_timer = self.service.reactor.callLater(
                timeout, lambda: self._time_out(request, started[0]) if started else None)
        d = defer.Deferred.fromCoroutine(self.handle(request))
        started.append(d)
        d.addBoth(self._answered, request)
        d.addErrback(self._failed, request)
        request.notifyFinish().addErrback(lambda _: d.cancel())
        return server.NOT_DONE_YET

    render_HEAD = render_GET

    @staticmethod
    def _time_out(request: Any, d: defer.Deferred[Any]) -> None:
        request.answer_timer = None
        request.timed_out = True
        d.cancel()

    @staticmethod
    def _answered(result: Any, request: Any) -> Any:
        """The answer is known: the timeout no longer applies."""
        timer = getattr(request, "answer_timer", None)
        if timer is not None:
            request.answer_timer = None
            if timer.active():
                timer.cancel()
        return result

    def _failed(self, failure: Failure, request: Any) -> None:
        if request.finished or request._disconnected:
            return  # the client went away: nothing to answer
        if failure.check(defer.TimeoutError) or (failure.check(defer.CancelledError) and request.timed_out):
            err: BaseException = Timeout("the image took too long")
        elif failure.check(ImageServerError):
            err = failure.value
        elif failure.check(QueueFull):
            err = Overloaded("too many files open; try again shortly", retry_after=_retry_after(self.service))
        else:
            log.failure("unexpected error serving {uri}", failure, uri=request.uri.decode("latin-1")[:200])
            err = InternalError("internal error")
        _send_error(request, err)

    def _image_path(self, request: Any) -> str:
        """The image path, percent-decoded once (``'/'``-joined checked
        segments), and checked against the signature when the server has a
        secret: the signature covers this endpoint's name, this decoded path
        and the canonical query.

        twisted.web chose this resource by the first path segment, decoded
        (``/images/``, ``/%69mages/``, ...): the image path is whatever
        follows that segment as it was sent, not a fixed number of bytes.
        """
        parts = request.path.split(b"/", 2)  # b"", the endpoint, the rest
        raw = parts[2] if len(parts) == 3 else b""
        path = paths.join(paths.split_url_path(raw))
        if self.settings.signed:
            signing.verify(self.settings.secret, self.endpoint, path, request.args)
        return path


class ImagesResource(_AsyncResource):
    endpoint = "images"

    async def handle(self, request: Any) -> None:
        path = self._image_path(request)
        args = {k: v for k, v in request.args.items() if k != b"s"}
        spec = parse_transform(args, max_dimension=self.settings.max_dimension,
                               default_quality=self.settings.default_quality,
                               presets=self.settings.preset_params)
        if spec is not None and spec.auto_format:
            # The answer depends on Accept: say so (caches key on it), and
            # resolve the format now so that it is part of the cache key and ETag.
            request.setHeader(b"Vary", b"Accept")
            spec = spec.negotiate(request.getHeader(b"accept"))
        # One descriptor for the whole answer: headers, preconditions, ranges,
        # sniffing, loading and streaming all come from it and its fstat.
        located = await self.service.open_image(path, sniff=spec is None)
        try:
            if spec is None:
                await self._original(request, located)
            else:
                await self._transformed(request, located, spec)
        finally:
            located.close()

    @staticmethod
    def _conditional_headers(request: Any) -> dict[str, str]:
        """The request's conditional and range headers, as conditional.evaluate takes them."""
        found = {}
        for name in conditional.CONDITIONAL_HEADERS:
            values = request.requestHeaders.getRawHeaders(name.encode("ascii"))
            if values:
                found[name] = ", ".join(v.decode("latin-1") for v in values)
        return found

    def _validators(self, request: Any, etag: str, mtime: float) -> None:
        request.setHeader(b"ETag", etag.encode("ascii"))
        request.setHeader(b"Last-Modified", conditional.http_date(mtime).encode("ascii"))
        request.setHeader(b"Cache-Control", self.settings.cache_control.encode("latin-1"))

    async def _original(self, request: Any, located: Any) -> None:
        # Every check that can end in an error comes before the first header
        # of the answer: an error never carries an image's headers.
        service = self.service
        if located.content_type is None:
            raise UnsupportedImage("not an image this server serves (JPEG, PNG, WebP, GIF or AVIF)")
        service.check_size(located)
        etag, mtime, size = located.etag, located.mtime, located.size
        headers = self._conditional_headers(request)
        outcome = conditional.evaluate(request.method, etag, mtime, headers)
        if outcome is conditional.PRECONDITION_FAILED:
            raise PreconditionFailed()
        if outcome is conditional.NOT_MODIFIED:
            located.close()
            self._validators(request, etag, mtime)
            request.setResponseCode(http.NOT_MODIFIED)
            request.finish()
            return
        try:
            wanted = conditional.select_range(request.method, headers, size, etag, mtime)
        except conditional.Unsatisfiable as e:
            raise RangeNotSatisfiable(e.size) from None  # 416 as a JSON error, like the others
        offset, length = wanted if wanted is not None else (0, size)
        sending = request.method != b"HEAD" and length > 0
        place = service.reserve_stream(length) if sending else None  # 503 when the lane is full
        try:
            self._validators(request, etag, mtime)
            request.setHeader(b"Accept-Ranges", b"bytes")
            request.setHeader(b"Content-Type", located.content_type.encode("ascii"))
            if wanted is not None:
                request.setResponseCode(http.PARTIAL_CONTENT)
                request.setHeader(b"Content-Range", conditional.content_range(offset, length, size).encode())
            request.setHeader(b"Content-Length", str(length).encode())
            if not sending:
                located.close()
                request.finish()
                return
            # The answer starts now: the timeout bounds the wait for it, not the
            # transfer (a large original to a slow client may take its time).
            self._answered(None, request)
            try:
                sent = await service.stream_original(located, request, offset, length, place=place)
            except ConsumerStopped:
                return  # the client went away
        finally:
            if place is not None:
                place.release()  # idempotent: stream_original released it already
        located.close()
        if sent != length:
            # The file shrank (in place) since its fstat: the promised length
            # cannot be met; the client sees a short answer, not a wrong one.
            if request.channel is not None:
                request.channel.loseConnection()
            return
        request.finish()

    async def _transformed(self, request: Any, located: Any, spec: Any) -> None:
        # Weak: the bytes depend on Pillow's and the codecs' versions, while
        # the tag only names the source version and the canonical transform.
        # The version includes device and inode: a file replaced by another of
        # the same size and mtime (``cp -p``) must not be answered 304 -- so
        # instances on other machines give other tags for the same transform.
        etag = f'W/"{located.result_key(spec).local_digest().hex()}"'
        mtime = located.mtime
        outcome = conditional.evaluate(request.method, etag, mtime, self._conditional_headers(request))
        if outcome is conditional.PRECONDITION_FAILED:
            raise PreconditionFailed()
        if outcome is conditional.NOT_MODIFIED:
            located.close()
            self._validators(request, etag, mtime)
            request.setResponseCode(http.NOT_MODIFIED)
            request.finish()
            return
        pending = self.service.transform_located(located, spec)
        # The work (if this request started it) holds its own view of the
        # descriptor until its load is done; this request needs none while it
        # waits in the queue, nor while a client reads the body.
        located.close()
        result = await pending
        self._validators(request, etag, mtime)
        request.setHeader(b"Content-Type", result.content_type.encode("ascii"))
        request.setHeader(b"Content-Length", str(len(result.body)).encode())
        if request.method == b"HEAD":
            request.finish()
            return
        self._answered(None, request)
        try:
            # In slices as the client takes them: a cached body is shared by
            # every client, never copied whole per slow reader.
            await write_body(request, result.body)
        except ConsumerStopped:
            return
        request.finish()


class InfoResource(_AsyncResource):
    endpoint = "info"

    async def handle(self, request: Any) -> None:
        path = self._image_path(request)
        located = await self.service.open_image(path, sniff=False)
        try:
            pending = self.service.info_located(located)
        finally:
            located.close()  # the work holds its own view of the descriptor
        info = await pending
        body = json.dumps(info).encode()
        request.setHeader(b"Content-Type", b"application/json")
        request.setHeader(b"Content-Length", str(len(body)).encode())
        if request.method != b"HEAD":
            request.write(body)
        request.finish()


def _retry_after(service: Any) -> int:
    retry_after = getattr(service, "retry_after", None)
    return int(retry_after()) if retry_after is not None else 1


def local_health(service: Any, metrics: Metrics, site: "ImageSite | None") -> dict[str, Any]:
    """This process's health: the service's, plus reactor lag and connections
    (what ``/healthz`` says, and what a worker publishes for the others)."""
    health = dict(service.health())
    reasons = list(health.get("reasons", ()))
    lag = metrics.lag.current()
    if lag > LAG_DEGRADED:
        reasons.append("reactor lag")
    health["reactor_lag"] = round(lag, 3)
    if site is not None:
        health["connections"] = len(site.channels)
        health["max_connections"] = site.settings.max_connections
        if len(site.channels) >= site.settings.max_connections:
            reasons.append("connections full")
    health["reasons"] = reasons
    health["status"] = "degraded" if reasons else "ok"
    return health


class HealthResource(resource.Resource):
    """``GET /healthz``: the service's health plus the HTTP layer's (reactor
    lag, connections); ``503`` with ``Retry-After`` when degraded.  In a
    worker of ``--processes N`` it speaks for every worker (degraded when one
    is missing, stale or degraded; :mod:`imgserver.cluster`)."""

    isLeaf = True

    def __init__(self, service: ImageService, metrics: Metrics) -> None:
        super().__init__()
        self.service = service
        self.metrics = metrics

    def render_GET(self, request: Any) -> bytes:
        request.endpoint = "healthz"
        service = self.service
        site = getattr(request, "site", None)
        health = local_health(service, self.metrics, site if isinstance(site, ImageSite) else None)
        cluster = self.metrics.cluster
        if cluster is not None:  # --processes N: every worker's health
            health = cluster.health(health)
        if health["reasons"]:
            request.setResponseCode(503)
            request.setHeader(b"Retry-After", str(_retry_after(service)).encode("ascii"))
        request.setHeader(b"Content-Type", b"application/json")
        request.setHeader(b"Cache-Control", b"no-store")
        return json.dumps(health).encode()


class NotFoundResource(resource.Resource):
    isLeaf = True

    def render(self, request: Any) -> bytes:
        err = NotFound("no such endpoint")
        request.setResponseCode(404)
        for name, value in error_headers(err):
            request.setHeader(name, value)
        return error_body(err)


class RootResource(resource.Resource):
    def __init__(self, service: ImageService, metrics: Metrics) -> None:
        super().__init__()
        self.putChild(b"images", ImagesResource(service))
        self.putChild(b"info", InfoResource(service))
        self.putChild(b"healthz", HealthResource(service, metrics))
        self.putChild(b"metrics", MetricsResource(metrics))

    def getChild(self, path: bytes, request: Any) -> resource.Resource:
        return NotFoundResource()

    def render(self, request: Any) -> bytes:
        return NotFoundResource().render(request)


def make_site(service: ImageService, metrics: Metrics | None = None, *, gallery: bool = False) -> ImageSite:
    """The site; ``gallery``: also the HTML gallery at ``/`` (:mod:`imgserver.gallery`)."""
    metrics = metrics if metrics is not None else Metrics(service)
    root = RootResource(service, metrics)
    if gallery:
        from .gallery import install  # here: gallery builds on this module

        install(root, service)
    return ImageSite(root, service, metrics)
