"""The HTTP face of the image server (twisted.web): a thin shell over ImageService.

    GET|HEAD /images/<path>              the original, streamed (ETag, Last-Modified, 304, Range → 206)
    GET|HEAD /images/<path>?w=&h=&fit=&fm=&q=   a transformed image
    GET      /info/<path>                JSON width, height, format, mode, bytes
    GET      /healthz                    JSON status and load
    GET      /metrics                    Prometheus text format

Errors are a status and a short JSON body; never a traceback or a path.
``timeout`` bounds the wait for an answer (504), not the transfer of an
original.  Every request gets one access-log line (namespace
``imgserver.access``) and a count in ``imgserver_requests``; one whose
client left before the answer started is logged as 499.
"""

from __future__ import annotations

import hashlib
import json
import time
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http, resource, server

from asyncfile import ConsumerStopped

from . import signing
from .conditional import Unsatisfiable, http_date, not_modified, parse_range, range_applies
from .errors import ImageServerError, InternalError, NotFound, Timeout, error_body, error_headers, error_status
from .metrics import Metrics, MetricsResource
from .params import parse_transform
from .service import ImageService

__all__ = ["ImageSite", "make_site"]

access_log = Logger(namespace="imgserver.access")
log = Logger(namespace="imgserver.web")

CACHE_CONTROL = b"public, max-age=86400"

#: Logged (never sent) for a request whose client went away before the answer
#: started: nginx's convention.
CLIENT_CLOSED_REQUEST = 499


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
        site = getattr(self.channel, "site", None)
        if isinstance(site, ImageSite) and site.stopping:
            self.close_after_answer()  # arrived on a kept-alive connection while stopping
        super().process()

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


class ImageSite(server.Site):
    """The site, which also keeps track of its connections and of the requests
    not yet answered, for a graceful stop."""

    requestFactory = ImageRequest

    def __init__(self, root: resource.Resource, service: ImageService, metrics: Metrics) -> None:
        super().__init__(root)
        self.service = service
        self.metrics = metrics
        self.displayTracebacks = False
        #: Requests received and not yet finished (or given up by their client).
        self.requests: set[ImageRequest] = set()
        #: Open HTTP connections, busy or idle: channel -> its transport.
        self.channels: dict[Any, Any] = {}
        #: Set by drain(): connections are no longer kept alive.
        self.stopping = False

    def buildProtocol(self, addr: Any) -> Any:
        channel = super().buildProtocol(addr)
        if channel is None:
            return None
        made, lost = channel.makeConnection, channel.connectionLost

        def make_connection(transport: Any) -> None:
            self.channels[channel] = transport
            made(transport)

        def connection_lost(reason: Failure) -> None:
            self.channels.pop(channel, None)
            lost(reason)

        channel.makeConnection, channel.connectionLost = make_connection, connection_lost
        return channel

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
        d = defer.Deferred.fromCoroutine(self.handle(request))
        timeout = self.settings.timeout
        if timeout and not d.called:
            timer = self.service.reactor.callLater(timeout, self._time_out, request, d)
            request.answer_timer = timer
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
        else:
            log.failure("unexpected error serving {uri}", failure, uri=request.uri.decode("latin-1")[:200])
            err = InternalError("internal error")
        _send_error(request, err)

    def _image_path(self, request: Any) -> bytes:
        """The raw (still percent-encoded) image path, checked against the
        signature when the server has a secret.

        twisted.web chose this resource by the first path segment, decoded
        (``/images/``, ``/%69mages/``, ...): the image path is whatever
        follows that segment as it was sent, not a fixed number of bytes.
        """
        parts = request.path.split(b"/", 2)  # b"", the endpoint, the rest
        raw = parts[2] if len(parts) == 3 else b""
        if self.settings.signed:
            signing.verify(self.settings.secret, raw, request.args)
        return raw


class ImagesResource(_AsyncResource):
    endpoint = "images"

    async def handle(self, request: Any) -> None:
        raw = self._image_path(request)
        args = {k: v for k, v in request.args.items() if k != b"s"}
        spec = parse_transform(args, max_dimension=self.settings.max_dimension,
                               default_quality=self.settings.default_quality)
        if spec is None:
            await self._original(request, raw)
        else:
            await self._transformed(request, raw, spec)

    async def _original(self, request: Any, raw: bytes) -> None:
        located, content_type = await self.service.original(raw)
        mtime = located.mtime_ns / 1e9
        request.setHeader(b"ETag", located.etag.encode())
        request.setHeader(b"Last-Modified", http_date(mtime).encode())
        request.setHeader(b"Cache-Control", CACHE_CONTROL)
        request.setHeader(b"Accept-Ranges", b"bytes")
        if not_modified(located.etag, mtime, _header(request, b"if-none-match"),
                        _header(request, b"if-modified-since")):
            request.setResponseCode(http.NOT_MODIFIED)
            request.finish()
            return
        request.setHeader(b"Content-Type", content_type.encode())
        offset, length = 0, located.size
        range_header = _header(request, b"range")
        if range_header is not None and not range_applies(_header(request, b"if-range"), located.etag,
                                                          mtime, time.time()):
            range_header = None  # the client's copy is stale: send it all
        try:
            wanted = parse_range(range_header, located.size)
        except Unsatisfiable:
            request.setResponseCode(http.REQUESTED_RANGE_NOT_SATISFIABLE)
            request.setHeader(b"Content-Range", f"bytes */{located.size}".encode())
            request.setHeader(b"Content-Length", b"0")
            request.finish()
            return
        if wanted is not None:
            offset, length = wanted
            request.setResponseCode(http.PARTIAL_CONTENT)
            request.setHeader(b"Content-Range",
                              f"bytes {offset}-{offset + length - 1}/{located.size}".encode())
        request.setHeader(b"Content-Length", str(length).encode())
        if request.method == b"HEAD" or length == 0:
            request.finish()
            return
        # The answer starts now: the timeout bounds the wait for it, not the
        # transfer (a large original to a slow client may take its time).
        self._answered(None, request)
        try:
            sent = await self.service.loader.stream(located.real_path, request, offset, length)
        except ConsumerStopped:
            return  # the client went away
        except FileNotFoundError:
            raise NotFound("no such image") from None
        if sent != length:
            # The file shrank since stat: the promised length cannot be met.
            request.channel.loseConnection() if request.channel else None
            return
        request.finish()

    async def _transformed(self, request: Any, raw: bytes, spec: Any) -> None:
        located = await self.service.locate(raw)
        etag = '"' + hashlib.blake2b(f"{located.etag}|{spec.cache_key()}".encode(), digest_size=12).hexdigest() + '"'
        mtime = located.mtime_ns / 1e9
        request.setHeader(b"ETag", etag.encode())
        request.setHeader(b"Last-Modified", http_date(mtime).encode())
        request.setHeader(b"Cache-Control", CACHE_CONTROL)
        if not_modified(etag, mtime, _header(request, b"if-none-match"),
                        _header(request, b"if-modified-since")):
            request.setResponseCode(http.NOT_MODIFIED)
            request.finish()
            return
        result = await self.service.transform(raw, spec)
        request.setHeader(b"Content-Type", result.content_type.encode())
        request.setHeader(b"Content-Length", str(len(result.body)).encode())
        if request.method != b"HEAD":
            request.write(result.body)
        request.finish()


class InfoResource(_AsyncResource):
    endpoint = "info"

    async def handle(self, request: Any) -> None:
        raw = self._image_path(request)
        info = await self.service.info(raw)
        body = json.dumps(info).encode()
        request.setHeader(b"Content-Type", b"application/json")
        request.setHeader(b"Content-Length", str(len(body)).encode())
        if request.method != b"HEAD":
            request.write(body)
        request.finish()


class HealthResource(resource.Resource):
    isLeaf = True

    def __init__(self, service: ImageService) -> None:
        super().__init__()
        self.service = service

    def render_GET(self, request: Any) -> bytes:
        request.endpoint = "healthz"
        stats = self.service.stats()
        request.setHeader(b"Content-Type", b"application/json")
        request.setHeader(b"Cache-Control", b"no-store")
        return json.dumps({"status": "ok", "in_processing": stats["in_processing"],
                           "queued": stats["queued"], "max_queue": stats["max_queue"]}).encode()


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
        self.putChild(b"healthz", HealthResource(service))
        self.putChild(b"metrics", MetricsResource(metrics))

    def getChild(self, path: bytes, request: Any) -> resource.Resource:
        return NotFoundResource()

    def render(self, request: Any) -> bytes:
        return NotFoundResource().render(request)


def _header(request: Any, name: bytes) -> str | None:
    value = request.getHeader(name)
    return value.decode("latin-1") if value is not None else None


def make_site(service: ImageService, metrics: Metrics | None = None) -> ImageSite:
    metrics = metrics if metrics is not None else Metrics(service)
    return ImageSite(RootResource(service, metrics), service, metrics)
