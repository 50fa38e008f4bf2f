"""Server metrics: one snapshot as JSON, or Prometheus' text exposition format.

Requests are counted by route template (``/v1/chat/completions``), never by the raw path,
so probing unknown paths adds no rows: they all count as ``other``. prometheus_client
writes the exposition format (label escaping, types, ``_total`` names).
"""
from __future__ import annotations

import collections
import threading
import time
from typing import Any

import mlx.core as mx
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from .models import Models, resident_memory_bytes


class Metrics:
    def __init__(self) -> None:
        self.started = time.time()
        self._lock = threading.Lock()
        self.requests: collections.Counter = collections.Counter()   # (route template, status) -> count
        self.in_flight = 0
        self.preparing = 0     # admitted requests not yet in the generation loop's queue (fetching, planning)
        self.media: Any = None  # the server's MediaLoader (fetches and decodes in progress)
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
            if getattr(b, "prefix_refusal", None):
                prefix["disabled"] = b.prefix_refusal
        with self._lock:
            by_route = [{"route": r, "status": s, "count": c} for (r, s), c in sorted(self.requests.items())]
            ttft, latency = sorted(self.ttft), sorted(self.latency)
        return {
            "uptime_seconds": round(time.time() - self.started, 1),
            "model": resident.id if resident else None,
            "model_loads": models.loads,
            "requests": by_route,
            "requests_in_flight": self.in_flight,
            "requests_preparing": self.preparing,
            "image_fetches_in_flight": self.media.fetcher.in_flight if self.media else 0,
            "images_decoding": self.media.decoding if self.media else 0,
            "prompt_tokens_total": counters.get("prompt_tokens", 0),
            "generation_tokens_total": counters.get("generation_tokens", 0),
            "generation_tokens_per_second": round(self.tokens_per_second(), 2),
            "queue_depth": loop.get("queue_depth", 0),
            "batch_size": loop.get("batch_size", 0),
            "decode_steps_total": counters.get("decode_steps", 0),
            "speculative_steps_total": counters.get("speculative_steps", 0),
            "draft_tokens_proposed_total": counters.get("draft_proposed", 0),
            "draft_tokens_accepted_total": counters.get("draft_accepted", 0),
            "draft_calls_total": counters.get("draft_calls", 0),
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


def prometheus(snap: dict[str, Any]) -> bytes:
    """The snapshot in Prometheus' text format."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Snapshot(snap))
    return generate_latest(registry)


class _Snapshot:
    def __init__(self, snap: dict[str, Any]):
        self.snap = snap

    def collect(self):
        snap = self.snap

        def counter(name: str, value: Any, help_: str):
            family = CounterMetricFamily(f"vlmc_{name}", help_)
            family.add_metric([], value or 0)
            return family

        def gauge(name: str, value: Any, help_: str):
            if value is None:
                return None
            family = GaugeMetricFamily(f"vlmc_{name}", help_)
            family.add_metric([], float(value))
            return family

        requests = CounterMetricFamily("vlmc_requests", "HTTP requests by route template and status",
                                       labels=["route", "status"])
        for row in snap["requests"]:
            requests.add_metric([row["route"], str(row["status"])], row["count"])
        cache, prefix, loop = snap["vision_cache"], snap["prefix_cache"], snap["generation_loop"]
        families = [
            requests,
            gauge("requests_in_flight", snap["requests_in_flight"], "generation requests not finished yet"),
            gauge("requests_preparing", snap["requests_preparing"],
                  "admitted requests fetching images or being prepared (they count against --max-queue)"),
            gauge("image_fetches_in_flight", snap["image_fetches_in_flight"], "image URLs being fetched"),
            gauge("images_decoding", snap["images_decoding"], "images being decoded"),
            counter("prompt_tokens", snap["prompt_tokens_total"], "prompt tokens prefilled"),
            counter("generation_tokens", snap["generation_tokens_total"], "tokens generated"),
            gauge("generation_tokens_per_second", snap["generation_tokens_per_second"],
                  "tokens generated per second over the last 10 s"),
            gauge("queue_depth", snap["queue_depth"], "requests waiting for a batch slot"),
            gauge("batch_size", snap["batch_size"], "sequences in the running decode batch"),
            counter("decode_steps", snap["decode_steps_total"], "batched decode steps"),
            counter("speculative_steps", snap["speculative_steps_total"], "batched verify steps of speculative decoding"),
            counter("draft_tokens_proposed", snap["draft_tokens_proposed_total"], "tokens drafted for verification"),
            counter("draft_tokens_accepted", snap["draft_tokens_accepted_total"], "drafted tokens the target accepted"),
            counter("draft_calls", snap["draft_calls_total"],
                    "calls of a drafter that drafts for every row at once (one per drafted position)"),
            counter("vision_cache_hits", cache.get("hits", 0), "images whose features came from the cache"),
            counter("vision_cache_misses", cache.get("misses", 0), "images encoded by the vision tower"),
            gauge("vision_cache_bytes", cache.get("bytes", 0), "bytes of cached vision features"),
            counter("prefix_cache_hit_tokens", prefix.get("hit_tokens", 0),
                    "prompt tokens whose KV came from the prefix cache"),
            counter("prefix_cache_miss_tokens", prefix.get("miss_tokens", 0), "prompt tokens prefilled"),
            gauge("prefix_cache_bytes", prefix.get("bytes", 0), "bytes of cached KV blocks and recurrent-state snapshots"),
            gauge("prefix_cache_state_bytes", prefix.get("state_bytes", 0),
                  "bytes of cached recurrent-state snapshots (linear-attention layers)"),
            gauge("prefix_cache_state_bytes_per_snapshot", prefix.get("state_bytes_per_snapshot", 0),
                  "bytes one block boundary's recurrent-state snapshot takes (0: no recurrent layers)"),
            counter("prefix_cache_corrupt_blocks", prefix.get("corrupt_blocks", 0) + prefix.get("disk_corrupt_blocks", 0),
                    "prefix-cache blocks dropped because they failed their checksum or shape check"),
            gauge("generation_loop_alive", int(bool(loop.get("alive"))), "1 while the generation loop runs"),
            gauge("mlx_active_memory_bytes", snap["mlx_active_memory_bytes"], "MLX memory in use"),
            gauge("resident_memory_bytes", snap["resident_memory_bytes"], "process resident set size"),
        ]
        for q in ("p50", "p99"):
            families.append(gauge(f"ttft_seconds_{q}", snap[f"ttft_seconds_{q}"],
                                  f"time to first token, {q} of the last 1000"))
            families.append(gauge(f"latency_seconds_{q}", snap[f"latency_seconds_{q}"],
                                  f"request start to its last token, {q} of the last 1000"))
        yield from (f for f in families if f is not None)


def _quantile(values: list[float], q: float) -> float | None:
    """The q-quantile of sorted ``values`` (nearest rank), None if empty."""
    if not values:
        return None
    return round(values[min(len(values) - 1, int(q * len(values)))], 4)
