"""Server metrics: one snapshot as JSON, or Prometheus' text exposition format."""
from __future__ import annotations

import collections
import threading
import time
from typing import Any

import mlx.core as mx

from .models import Models, resident_memory_bytes


class Metrics:
    def __init__(self) -> None:
        self.started = time.time()
        self._lock = threading.Lock()
        self.requests: collections.Counter = collections.Counter()   # (route, status) -> count
        self.in_flight = 0
        self._recent: collections.deque = collections.deque()          # (time, tokens) for tok/s
        self.ttft: collections.deque = collections.deque(maxlen=1000)     # seconds, last 1000 requests
        self.latency: collections.deque = collections.deque(maxlen=1000)  # request start to last token

    def finished(self, started: float, first_token_at: float | None) -> None:
        """A generation request ended (``time.perf_counter`` stamps)."""
        with self._lock:
            if first_token_at is not None:
                self.ttft.append(first_token_at - started)
            self.latency.append(time.perf_counter() - started)

    def record(self, route: str, status: int) -> None:
        with self._lock:
            self.requests[(route, status)] += 1

    def tokens(self, n: int = 1) -> None:
        now = time.time()
        with self._lock:
            self._recent.append((now, n))
            while self._recent and self._recent[0][0] < now - 10:
                self._recent.popleft()

    def tokens_per_second(self) -> float:
        now = time.time()
        with self._lock:
            while self._recent and self._recent[0][0] < now - 10:
                self._recent.popleft()
            return sum(n for _, n in self._recent) / 10.0

    def snapshot(self, models: Models) -> dict[str, Any]:
        resident = models.resident
        loop: dict[str, Any] = {"alive": False}
        cache: dict[str, Any] = {}
        prefix: dict[str, Any] = {}
        counters: dict[str, Any] = {}
        if resident is not None:
            b = resident.batcher
            loop = {"alive": b.alive, **b.load(), "decode_seconds": round(b.decode_time, 3)}
            counters = dict(b.counters)
            cache = resident.vision_cache.stats()
            prefix = resident.prefix_cache.stats()
        with self._lock:
            by_route = [{"route": r, "status": s, "count": c} for (r, s), c in sorted(self.requests.items())]
            ttft, latency = sorted(self.ttft), sorted(self.latency)
        return {
            "uptime_seconds": round(time.time() - self.started, 1),
            "model": resident.id if resident else None,
            "model_loads": models.loads,
            "requests": by_route,
            "requests_in_flight": self.in_flight,
            "prompt_tokens_total": counters.get("prompt_tokens", 0),
            "generation_tokens_total": counters.get("generation_tokens", 0),
            "generation_tokens_per_second": round(self.tokens_per_second(), 2),
            "queue_depth": loop.get("queue_depth", 0),
            "batch_size": loop.get("batch_size", 0),
            "decode_steps_total": counters.get("decode_steps", 0),
            "mean_batch_size": round(counters.get("batched_tokens", 0) / max(counters.get("decode_steps", 0), 1), 3),
            "ttft_seconds_p50": _quantile(ttft, 0.50),
            "ttft_seconds_p99": _quantile(ttft, 0.99),
            "latency_seconds_p50": _quantile(latency, 0.50),
            "latency_seconds_p99": _quantile(latency, 0.99),
            "vision_cache": cache,
            "prefix_cache": prefix,
            "generation_loop": loop,
            "mlx_active_memory_bytes": mx.get_active_memory(),
            "mlx_cache_memory_bytes": mx.get_cache_memory(),
            "resident_memory_bytes": resident_memory_bytes(),
        }


def prometheus(snap: dict[str, Any]) -> str:
    lines: list[str] = []

    def metric(name: str, kind: str, value: Any, help_: str, labels: str = "") -> None:
        if value is None:
            return
        if not any(line.startswith(f"# TYPE vlmc_{name} ") for line in lines):
            lines.append(f"# HELP vlmc_{name} {help_}")
            lines.append(f"# TYPE vlmc_{name} {kind}")
        lines.append(f"vlmc_{name}{labels} {float(value):g}" if not isinstance(value, int) else
                     f"vlmc_{name}{labels} {value}")

    for row in snap["requests"]:
        metric("requests_total", "counter", row["count"], "HTTP requests by route and status",
               f'{{route="{row["route"]}",status="{row["status"]}"}}')
    metric("requests_in_flight", "gauge", snap["requests_in_flight"], "generation requests not finished yet")
    metric("prompt_tokens_total", "counter", snap["prompt_tokens_total"], "prompt tokens prefilled")
    metric("generation_tokens_total", "counter", snap["generation_tokens_total"], "tokens generated")
    metric("generation_tokens_per_second", "gauge", snap["generation_tokens_per_second"],
           "tokens generated per second over the last 10 s")
    metric("queue_depth", "gauge", snap["queue_depth"], "requests waiting for a batch slot")
    metric("batch_size", "gauge", snap["batch_size"], "sequences in the running decode batch")
    metric("decode_steps_total", "counter", snap["decode_steps_total"], "batched decode steps")
    for q in ("p50", "p99"):
        metric(f"ttft_seconds_{q}", "gauge", snap[f"ttft_seconds_{q}"], f"time to first token, {q} of the last 1000")
        metric(f"latency_seconds_{q}", "gauge", snap[f"latency_seconds_{q}"],
               f"request start to its last token, {q} of the last 1000")
    cache = snap["vision_cache"]
    metric("vision_cache_hits_total", "counter", cache.get("hits", 0), "images whose features came from the cache")
    metric("vision_cache_misses_total", "counter", cache.get("misses", 0), "images encoded by the vision tower")
    metric("vision_cache_bytes", "gauge", cache.get("bytes", 0), "bytes of cached vision features")
    prefix = snap["prefix_cache"]
    metric("prefix_cache_hit_tokens_total", "counter", prefix.get("hit_tokens", 0),
           "prompt tokens whose KV came from the prefix cache")
    metric("prefix_cache_miss_tokens_total", "counter", prefix.get("miss_tokens", 0), "prompt tokens prefilled")
    metric("prefix_cache_bytes", "gauge", prefix.get("bytes", 0), "bytes of cached KV blocks")
    metric("generation_loop_alive", "gauge", int(bool(snap["generation_loop"].get("alive"))),
           "1 while the generation loop runs")
    metric("mlx_active_memory_bytes", "gauge", snap["mlx_active_memory_bytes"], "MLX memory in use")
    metric("resident_memory_bytes", "gauge", snap["resident_memory_bytes"], "process resident set size")
    return "\n".join(lines) + "\n"


def _quantile(values: list[float], q: float) -> float | None:
    """The q-quantile of sorted ``values`` (nearest rank), None if empty."""
    if not values:
        return None
    return round(values[min(len(values) - 1, int(q * len(values)))], 4)
