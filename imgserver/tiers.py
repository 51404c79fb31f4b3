"""Result tiers beyond the process's memory: the on-disk store and memcached.

A request whose result is not in the in-memory cache asks each tier in turn
(the machine's result store, then memcached) before it processes the image,
and a processed result is offered to every tier.  A tier is an optimisation,
never a dependency: it answers within its own deadline, and every failure
(a dead server, a full disk, a corrupt record) is a miss, counted in its
stats, never an error for the request.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from zope.interface import Attribute, Interface

from .processing import Result
from .record import ResultKey

__all__ = ["IResultTier"]


class IResultTier(Interface):
    """Somewhere transformed images are kept for other requests, processes or machines."""

    name = Attribute("Short name for stats and metrics: 'store', 'memcached'.")

    def get(key: ResultKey) -> defer.Deferred[Result | None]:
        """The result stored for ``key``, or None (a miss, a corrupt record, an
        error, or no answer within the tier's deadline).  Never fails;
        cancelling it stops the lookup and releases what it holds."""

    def put(key: ResultKey, result: Result) -> defer.Deferred[bool]:
        """Offer ``result``; fires with whether it was stored.  Never fails;
        bounded in time; a tier may decline (too large, shutting down)."""

    def stats() -> dict[str, Any]:
        """Counters (hits, misses, errors, stored, ...) for /stats and /metrics."""

    def close() -> defer.Deferred[None]:
        """Stop: lookups and writes in progress end (a write leaves no
        temporary file); later calls miss / decline.  Fires once all is released."""
