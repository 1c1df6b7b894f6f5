"""Prometheus metrics of one serving process (own registry, so tests can run several)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from serving.adapters import FollowState
from serving.engine import EngineStats

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class ServingMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("rlhf_serving_requests", "Generate requests by API and outcome",
                                ["api", "code"], registry=r)
        self.prompt_tokens = Counter("rlhf_serving_prompt_tokens",
                                     "Prompt tokens prefilled", registry=r)
        self.generated_tokens = Counter("rlhf_serving_generated_tokens",
                                        "Tokens generated, all alternatives", registry=r)
        self.queue_depth = Gauge("rlhf_serving_queue_depth",
                                 "Requests waiting for a batch slot", registry=r)
        self.running = Gauge("rlhf_serving_running_sequences",
                             "Sequences (alternatives) being decoded", registry=r)
        self.ttft = Histogram("rlhf_serving_time_to_first_token_seconds",
                              "From request accepted to its first token",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.adapter = Gauge("rlhf_serving_adapter_info",
                             "1 for the adapter version new requests get", ["version"],
                             registry=r)
        self.adapter_loaded = Gauge("rlhf_serving_adapter_loaded",
                                    "1 for every adapter version loaded", ["version"],
                                    registry=r)
        self.adapter_degraded = Gauge(
            "rlhf_serving_adapter_degraded", "1 while the registry's current version is "
            "refused here and an older one (or base) is served; 0 when they agree",
            ["registry_current", "serving"], registry=r)
        self.ready = Gauge("rlhf_serving_ready", "1 once the model is loaded", registry=r)
        self._tokens_seen = 0

    def on_step(self, stats: EngineStats) -> None:
        self.queue_depth.set(stats.waiting_requests)
        self.running.set(stats.running_rows)
        self.generated_tokens.inc(stats.tokens_generated - self._tokens_seen)
        self._tokens_seen = stats.tokens_generated

    def set_adapters(self, current: str, loaded: list[str]) -> None:
        self.adapter.clear()
        self.adapter.labels(version=current).set(1)
        self.adapter_loaded.clear()
        for version in loaded:
            self.adapter_loaded.labels(version=version).set(1)

    def set_follow(self, state: FollowState | None) -> None:
        self.adapter_degraded.clear()
        if state is not None and state.registry_current is not None:
            self.adapter_degraded.labels(registry_current=state.registry_current,
                                         serving=state.serving).set(int(state.degraded))

    def render(self) -> bytes:
        return generate_latest(self.registry)
