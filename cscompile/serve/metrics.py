"""Prometheus metrics of one server, in a registry of its own (two apps in a process do not mix)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cscompile.serve.scheduler import Hooks, Scheduler

#: latency buckets in seconds: sub-millisecond decode steps up to slow prefills behind a queue
_TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_ITL_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


class ServerMetrics:
    """Requests, tokens in and out, queue depth, running sequences, TTFT and inter-token latency."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "cscompile_requests",
            "HTTP API requests by endpoint and status code",
            ["endpoint", "status"],
            registry=r,
        )
        self.prompt_tokens = Counter(
            "cscompile_prompt_tokens", "Prompt tokens of admitted requests", registry=r
        )
        self.generation_tokens = Counter("cscompile_generation_tokens", "Tokens generated", registry=r)
        self.queue_depth = Gauge("cscompile_queue_depth", "Sequences waiting for a slot", registry=r)
        self.running = Gauge("cscompile_running_sequences", "Sequences being generated", registry=r)
        self.ttft = Histogram(
            "cscompile_time_to_first_token_seconds",
            "From a request's arrival in the queue to its first token",
            buckets=_TTFT_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "cscompile_inter_token_latency_seconds",
            "Between two tokens of one sequence",
            buckets=_ITL_BUCKETS,
            registry=r,
        )

    def hooks(self) -> Hooks:
        from cscompile.serve.scheduler import Hooks

        return Hooks(
            first_token=self.ttft.observe, inter_token=self.itl.observe, token=self.generation_tokens.inc
        )

    def watch(self, scheduler: Scheduler) -> None:
        """Read the gauges from ``scheduler`` at scrape time."""
        self.queue_depth.set_function(lambda: scheduler.queue_depth)
        self.running.set_function(lambda: scheduler.running)

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    def sample(self, name: str, labels: dict[str, str] | None = None) -> Any:
        """One sample's value (tests and the chat page's status line)."""
        return self.registry.get_sample_value(name, labels or {})
