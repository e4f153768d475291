"""Prometheus series of the OpenAI frontend, registered in the runtime's own registry.

They sit next to the runtime's ``troupe_*`` series, so the frontend's ``/metrics`` serves both.
Labels are bounded: ``model`` is a served model name (an unknown model counts as ``""``),
``endpoint`` is ``chat_completions`` / ``completions``, ``request_type`` is ``stream`` /
``unary``, ``status`` is ``success`` / ``error`` / ``cancelled``.

Series (prefix ``troupe_frontend_``): ``requests_total``, ``inflight_requests``,
``request_duration_seconds``, ``time_to_first_token_seconds``, ``inter_token_latency_seconds``,
``input_sequence_tokens``, ``output_sequence_tokens``, ``errors_total{code}``,
``cancellation_total``, ``migrations_total``, ``retries_total``.
"""

from __future__ import annotations

from typing import Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from troupe._support._metrics import DURATION_BUCKETS

__all__ = ["FrontendMetrics"]

_LATENCY_BUCKETS: Final = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    float("inf"),
)
_TOKEN_BUCKETS: Final = (
    1.0,
    4.0,
    16.0,
    64.0,
    256.0,
    1024.0,
    4096.0,
    16384.0,
    65536.0,
    float("inf"),
)


class FrontendMetrics:
    """Every frontend series, registered in ``registry`` (the runtime's)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        reg = self.registry = registry
        self.requests = Counter(
            "troupe_frontend_requests_total",
            "HTTP requests to the OpenAI routes, by outcome.",
            ("model", "endpoint", "request_type", "status"),
            registry=reg,
        )
        self.inflight = Gauge(
            "troupe_frontend_inflight_requests",
            "Requests being answered now.",
            ("model",),
            registry=reg,
        )
        self.duration = Histogram(
            "troupe_frontend_request_duration_seconds",
            "Time from request to the end of the response.",
            ("model",),
            registry=reg,
            buckets=DURATION_BUCKETS,
        )
        self.ttft = Histogram(
            "troupe_frontend_time_to_first_token_seconds",
            "Time from request to the first generated token.",
            ("model",),
            registry=reg,
            buckets=_LATENCY_BUCKETS,
        )
        self.itl = Histogram(
            "troupe_frontend_inter_token_latency_seconds",
            "Time between two consecutive chunks of generated tokens.",
            ("model",),
            registry=reg,
            buckets=_LATENCY_BUCKETS,
        )
        self.input_tokens = Histogram(
            "troupe_frontend_input_sequence_tokens",
            "Prompt tokens per request (as counted by the engine).",
            ("model",),
            registry=reg,
            buckets=_TOKEN_BUCKETS,
        )
        self.output_tokens = Histogram(
            "troupe_frontend_output_sequence_tokens",
            "Generated tokens per request.",
            ("model",),
            registry=reg,
            buckets=_TOKEN_BUCKETS,
        )
        self.errors = Counter(
            "troupe_frontend_errors_total",
            "Requests answered with an error, by HTTP status code.",
            ("model", "endpoint", "code"),
            registry=reg,
        )
        self.cancellations = Counter(
            "troupe_frontend_cancellation_total",
            "Requests whose client disconnected before the end; the worker was told to stop.",
            ("model", "endpoint", "request_type"),
            registry=reg,
        )
        self.migrations = Counter(
            "troupe_frontend_migrations_total",
            "Generations resumed on another worker after their worker failed.",
            ("model",),
            registry=reg,
        )

        self.retries = Counter(
            "troupe_frontend_retries_total",
            "Generations sent to another worker after one answered Overloaded.",
            ("model",),
            registry=reg,
        )

    def error(self, model: str, endpoint: str, request_type: str, status: int) -> None:
        """Count a request answered with an error status."""
        self.requests.labels(model, endpoint, request_type, "error").inc()
        self.errors.labels(model, endpoint, str(status)).inc()
