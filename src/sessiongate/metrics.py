"""Prometheus metrics of the HTTP service, in a private registry per app.

Gauges (capacity, active, queued; this process's local_active and local_queued, which
differ from the global ones in Redis mode) are read from the gate when scraped; counters and
histograms are updated as sessions end. A private ``CollectorRegistry`` per app keeps
two apps in one process (tests) from clashing over global metric names.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from prometheus_client import CONTENT_TYPE_LATEST as CONTENT_TYPE_LATEST
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import Metric

from ._stats import GateStats

#: Queue waits and run times, seconds: from a hand-off gap to the article's 60 s RTO.
_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900)

#: Reasons a session never got to run (or was stopped from the outside).
REFUSAL_REASONS = (
    "queue_full",
    "queue_timeout",
    "shutting_down",
    "backend_unavailable",
    "cancelled",
)
OUTCOMES = ("completed", "failed", "expired", "cancelled", "rejected")


class _Registry(CollectorRegistry):
    """A registry without prometheus-client's ``*_created`` samples: in the text format
    they show as gauges holding a Unix time, under the counter's own help text
    (``sessiongate_sessions_created`` read as a count of created sessions; an outside
    review). Left out here rather than with ``disable_created_metrics()``, which would
    change every registry of the embedding process."""

    def collect(self) -> Iterator[Metric]:
        for metric in super().collect():
            metric.samples = [s for s in metric.samples if not s.name.endswith("_created")]
            yield metric


class Metrics:
    """The service's collectors, registered in their own registry."""

    def __init__(self) -> None:
        self.registry = _Registry(auto_describe=True)
        r = self.registry
        self.capacity = Gauge("sessiongate_capacity", "Sessions allowed at once.", registry=r)
        self.active = Gauge("sessiongate_active_sessions", "Sessions holding a slot.", registry=r)
        self.queued = Gauge("sessiongate_queued_sessions", "Sessions waiting.", registry=r)
        # This process's share: the gauges above are global in Redis mode, so summing
        # them over the workers of one gate counts each session once per worker.
        self.local_active = Gauge(
            "sessiongate_local_active_sessions",
            "Sessions of this process holding a slot.",
            registry=r,
        )
        self.local_queued = Gauge(
            "sessiongate_local_queued_sessions", "Sessions of this process waiting.", registry=r
        )
        self.sessions = Counter(
            "sessiongate_sessions",
            "Sessions ended, by outcome.",
            ["outcome"],
            registry=r,
        )
        self.refusals = Counter(
            "sessiongate_refusals",
            "Sessions and arrivals refused at once that ended with a gate error code, by code.",
            ["reason"],
            registry=r,
        )
        self.queue_wait = Histogram(
            "sessiongate_queue_wait_seconds",
            "Seconds admitted sessions waited for a slot.",
            buckets=_BUCKETS,
            registry=r,
        )
        self.run_time = Histogram(
            "sessiongate_session_run_seconds",
            "Seconds sessions held their slot.",
            buckets=_BUCKETS,
            registry=r,
        )
        # Children made once: every label value shows (as 0) from the first scrape, and
        # counting a session is a dict lookup.
        self._by_outcome = {outcome: self.sessions.labels(outcome) for outcome in OUTCOMES}
        self._by_reason = {reason: self.refusals.labels(reason) for reason in REFUSAL_REASONS}

    def session_admitted(self, waited: float) -> None:
        """Observed at admission, as /stats counts it (not a whole run time later)."""
        self.queue_wait.observe(waited)

    def session_ended(self, outcome: str, ran: float | None) -> None:
        self._by_outcome[outcome].inc()
        if ran is not None:
            self.run_time.observe(ran)

    def refused(self, reason: str) -> None:
        child = self._by_reason.get(reason)
        if child is not None:
            child.inc()

    def render(
        self,
        stats: GateStats,
        *,
        local_active: int,
        local_queued: int,
        accept: Iterable[tuple[str, float]] = (),
    ) -> tuple[bytes, str]:
        """The metrics and their content type, in the format the scraper's ``Accept``
        asks for (prometheus-client's own choice: the classic text format 0.0.4 unless
        it asks for OpenMetrics or text 1.0.0; the library's default answered 1.0.0 to
        every scraper, one asking for 0.0.4 included: an outside review)."""
        self.capacity.set(stats.capacity)
        self.active.set(stats.active)
        self.queued.set(stats.queued)
        self.local_active.set(local_active)
        self.local_queued.set(local_queued)
        try:
            encoder, content_type = choose_encoder(_preferred(accept))
        except (TypeError, ValueError):
            # prometheus-client compares a "version=" it cannot read as a number and
            # raised (a 500 for "version=abc": an outside review): the default format.
            encoder, content_type = choose_encoder("")
        return encoder(self.registry), content_type


#: Media types a scrape may ask for that this server can answer (the wildcards with the
#: classic text format), and those that choose a format of their own.
_SERVED = {"application/openmetrics-text", "text/plain", "text/*", "*/*"}
_FORMATS = {"application/openmetrics-text", "text/plain"}


def _preferred(accepted: Iterable[tuple[str, float]]) -> str:
    """The media range to answer, for prometheus-client's ``choose_encoder``, from the
    scraper's ``Accept`` as werkzeug parses it (``request.accept_mimetypes``: highest
    quality first; ``q=0`` refuses). Given the whole header, ``choose_encoder`` took the
    first OpenMetrics range listed, a refused one or one the scraper liked less than
    the classic format included (an outside review)."""
    for value, quality in accepted:
        media = value.split(";")[0].strip().lower()
        if quality > 0 and media in _SERVED:
            return value if media in _FORMATS else ""
    return ""  # nothing it asks for is served: the classic format, as with no header
