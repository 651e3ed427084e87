"""Prometheus metrics of one process, in a registry of its own (no module-level global state)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

# Seconds: first words of an answer arrive within a few seconds; whole answers take up to minutes.
_FIRST_CONTENT_BUCKETS = (0.25, 0.5, 1, 2, 3, 5, 8, 13, 21, 34, 60)
# Seconds: a callback reply never waits on anything outside laibao; WeCom retries after about 5 s.
_CALLBACK_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5)
_ANSWER_BUCKETS = (1, 2, 5, 10, 20, 30, 60, 120, 240, 360, 600, 1200)


class Metrics:
    """Every metric laibao exports at /metrics."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.callbacks = Counter(
            "laibao_callbacks", "WeCom callbacks by bot, kind and outcome", ["bot", "kind", "outcome"],
            registry=self.registry,
        )
        self.callback_seconds = Histogram(
            "laibao_callback_reply_seconds", "Time to reply to a WeCom callback, by kind", ["kind"],
            buckets=_CALLBACK_BUCKETS, registry=self.registry,
        )
        self.active = Gauge("laibao_active_relays", "Answers being relayed from Dify on this process",
                            registry=self.registry)
        self.max_relays = Gauge("laibao_max_relays", "The cap on live answers per process (LAIBAO_MAX_RELAYS)",
                                registry=self.registry)
        self.cap_hits = Counter("laibao_relay_cap_hits", "Messages and takeovers left to another process because "
                                "this one was at LAIBAO_MAX_RELAYS", registry=self.registry)
        self.first_content = Histogram(
            "laibao_first_content_seconds", "From the relay's start to the first answer text in the store",
            buckets=_FIRST_CONTENT_BUCKETS, registry=self.registry,
        )
        self.answer = Histogram("laibao_answer_seconds", "Duration of complete answers", buckets=_ANSWER_BUCKETS,
                                registry=self.registry)
        self.dify_errors = Counter("laibao_dify_errors", "Failed Dify calls by bot and Dify error code",
                                   ["bot", "code"], registry=self.registry)
        self.takeovers = Counter("laibao_takeovers", "Streams this process took over from a dead or draining one",
                                 ["bot"], registry=self.registry)
        self.store_errors = Counter("laibao_store_errors", "Operations that failed because a store was unreachable",
                                    registry=self.registry)

    def add_counters(self, name: str, documentation: str, label: str, counts: dict[str, int]) -> None:
        """Export a live dict of counts kept elsewhere (e.g. auth cache levels) as a labelled counter."""
        self.registry.register(_CountsCollector(name, documentation, label, counts))

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)


class _CountsCollector(Collector):
    def __init__(self, name: str, documentation: str, label: str, counts: dict[str, int]) -> None:
        self._name = name
        self._documentation = documentation
        self._label = label
        self._counts = counts

    def collect(self) -> list[CounterMetricFamily]:
        family = CounterMetricFamily(self._name, self._documentation, labels=[self._label])
        for key, value in sorted(self._counts.items()):
            family.add_metric([key], value)
        return [family]
