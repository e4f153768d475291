"""RuntimeMetrics: labelled series, the per-request scope, and in-flight always returning to 0."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncGenerator

import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from troupe._support._metrics import EndpointMetrics, RuntimeMetrics, error_kind
from troupe.errors import Cancelled, ConnectTimeout, Overloaded, StreamBroken

EP = {"namespace": "ns", "component": "backend", "endpoint": "generate"}


def sample(m: RuntimeMetrics, name: str, **labels: str) -> float:
    value = m.registry.get_sample_value(name, {**EP, **labels})
    return 0.0 if value is None else value


@pytest.fixture
def metrics() -> RuntimeMetrics:
    return RuntimeMetrics()


@pytest.fixture
def ep(metrics: RuntimeMetrics) -> EndpointMetrics:
    return metrics.endpoint("ns", "backend", "generate")


def test_endpoint_is_bound_once(metrics: RuntimeMetrics, ep: EndpointMetrics) -> None:
    assert metrics.endpoint("ns", "backend", "generate") is ep
    assert ep.labels == ("ns", "backend", "generate")
    assert metrics.endpoint("ns", "backend", "other") is not ep


def test_started_and_finished_count_everything(
    metrics: RuntimeMetrics, ep: EndpointMetrics
) -> None:
    ep.started(100)
    ep.started(20)
    assert sample(metrics, "troupe_inflight_requests") == 2
    ep.finished("ok", 0.003, 400)
    ep.finished("handler", 0.2)
    assert sample(metrics, "troupe_requests_total") == 2
    assert sample(metrics, "troupe_inflight_requests") == 0
    assert sample(metrics, "troupe_request_bytes_total") == 120
    assert sample(metrics, "troupe_response_bytes_total") == 400
    assert sample(metrics, "troupe_errors_total", kind="handler") == 1
    assert sample(metrics, "troupe_cancellations_total") == 0
    assert sample(metrics, "troupe_request_duration_seconds_count") == 2
    assert sample(metrics, "troupe_request_duration_seconds_sum") == pytest.approx(0.203)
    assert sample(metrics, "troupe_request_duration_seconds_bucket", le="0.005") == 1


def test_cancelled_outcome_counts_as_cancellation_not_error(
    metrics: RuntimeMetrics, ep: EndpointMetrics
) -> None:
    ep.started()
    ep.finished("cancelled", 0.01)
    assert sample(metrics, "troupe_cancellations_total") == 1
    assert (
        metrics.registry.get_sample_value("troupe_errors_total", {**EP, "kind": "cancelled"})
        is None
    )


def test_track_ok_counts_response_bytes(metrics: RuntimeMetrics, ep: EndpointMetrics) -> None:
    with ep.track(10) as req:
        assert sample(metrics, "troupe_inflight_requests") == 1
        req.add_response_bytes(5)
        req.add_response_bytes(7)
    assert sample(metrics, "troupe_inflight_requests") == 0
    assert sample(metrics, "troupe_request_bytes_total") == 10
    assert sample(metrics, "troupe_response_bytes_total") == 12
    assert sample(metrics, "troupe_request_duration_seconds_count") == 1


@pytest.mark.parametrize(
    ("exc", "kind"),
    [
        (ValueError("boom"), "handler"),
        (Overloaded("ns.backend.generate", 4), "overloaded"),
        (TimeoutError(), "timeout"),
        (ConnectTimeout("tcp://127.0.0.1:1", 1.0), "timeout"),
        (StreamBroken("gone"), "transport"),
    ],
)
def test_track_error_settles_inflight_and_reraises(
    metrics: RuntimeMetrics, ep: EndpointMetrics, exc: Exception, kind: str
) -> None:
    with pytest.raises(type(exc)), ep.track(1):
        raise exc
    assert sample(metrics, "troupe_inflight_requests") == 0
    assert sample(metrics, "troupe_errors_total", kind=kind) == 1
    assert sample(metrics, "troupe_requests_total") == 1


async def test_track_settles_inflight_on_task_cancellation(
    metrics: RuntimeMetrics, ep: EndpointMetrics
) -> None:
    entered = asyncio.Event()

    async def handler() -> None:
        with ep.track(3):
            entered.set()
            await asyncio.Event().wait()  # until cancelled

    task = asyncio.create_task(handler(), name="test-handler")
    await asyncio.wait_for(entered.wait(), 5)
    assert sample(metrics, "troupe_inflight_requests") == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert sample(metrics, "troupe_inflight_requests") == 0
    assert sample(metrics, "troupe_cancellations_total") == 1
    assert sample(metrics, "troupe_errors_total", kind="handler") == 0


async def test_abandoned_stream_counts_as_cancelled(
    metrics: RuntimeMetrics, ep: EndpointMetrics
) -> None:
    """A streaming handler whose consumer stops early is closed with GeneratorExit."""

    async def stream() -> AsyncGenerator[bytes, None]:
        with ep.track(1) as req:
            for n in range(10):
                req.add_response_bytes(1)
                yield bytes([n])

    gen = stream()
    assert await anext(gen) == b"\x00"
    assert sample(metrics, "troupe_inflight_requests") == 1
    await gen.aclose()
    assert sample(metrics, "troupe_inflight_requests") == 0
    assert sample(metrics, "troupe_cancellations_total") == 1
    assert sample(metrics, "troupe_response_bytes_total") == 1
    assert sample(metrics, "troupe_errors_total", kind="handler") == 0


def test_track_troupe_cancelled_is_a_cancellation(
    metrics: RuntimeMetrics, ep: EndpointMetrics
) -> None:
    with pytest.raises(Cancelled), ep.track():
        raise Cancelled("caller went away")
    assert sample(metrics, "troupe_cancellations_total") == 1


def test_fail_records_outcome_without_raising(metrics: RuntimeMetrics, ep: EndpointMetrics) -> None:
    with ep.track() as req:
        req.fail("deserialization")
    assert sample(metrics, "troupe_errors_total", kind="deserialization") == 1
    assert sample(metrics, "troupe_inflight_requests") == 0


def test_finish_is_idempotent(metrics: RuntimeMetrics, ep: EndpointMetrics) -> None:
    with ep.track() as req:
        req.finish()
        req.finish("handler")
    assert sample(metrics, "troupe_inflight_requests") == 0
    assert sample(metrics, "troupe_request_duration_seconds_count") == 1
    assert sample(metrics, "troupe_errors_total", kind="handler") == 0


def test_error_kind_is_bounded() -> None:
    class WeirdUserError(Exception):
        pass

    assert error_kind(WeirdUserError()) == "handler"
    assert error_kind(asyncio.CancelledError()) == "cancelled"
    assert error_kind(Cancelled()) == "cancelled"


def test_concurrent_requests_from_threads(metrics: RuntimeMetrics, ep: EndpointMetrics) -> None:
    per_thread, threads = 200, 4

    def work() -> None:
        for i in range(per_thread):
            try:
                with ep.track(1) as req:
                    req.add_response_bytes(2)
                    if i % 10 == 0:
                        raise ValueError(i)
            except ValueError:
                pass

    workers = [threading.Thread(target=work, name=f"metrics-{n}") for n in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join(30)
        assert not t.is_alive()
    total = per_thread * threads
    assert sample(metrics, "troupe_requests_total") == total
    assert sample(metrics, "troupe_inflight_requests") == 0
    assert sample(metrics, "troupe_response_bytes_total") == 2 * total
    assert sample(metrics, "troupe_errors_total", kind="handler") == total // 10


def test_render_is_parseable_text_with_labelled_series(
    metrics: RuntimeMetrics, ep: EndpointMetrics
) -> None:
    with ep.track(8):
        pass
    text = metrics.render().decode()
    assert (
        'troupe_requests_total{component="backend",endpoint="generate",namespace="ns"} 1.0' in text
    )
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name in (
        "troupe_requests",
        "troupe_inflight_requests",
        "troupe_request_duration_seconds",
        "troupe_errors",
        "troupe_request_bytes",
        "troupe_response_bytes",
        "troupe_cancellations",
        "troupe_uptime_seconds",
    ):
        assert name in families, name
    assert families["troupe_request_duration_seconds"].type == "histogram"
    assert families["troupe_inflight_requests"].type == "gauge"


def test_uptime_is_computed_at_scrape_time() -> None:
    now = [100.0]
    metrics = RuntimeMetrics(now=lambda: now[0])
    assert metrics.registry.get_sample_value("troupe_uptime_seconds") == 0
    now[0] = 142.5
    assert metrics.registry.get_sample_value("troupe_uptime_seconds") == 42.5
    assert metrics.uptime_seconds() == 42.5


def test_runtimes_have_separate_registries() -> None:
    a, b = RuntimeMetrics(), RuntimeMetrics()
    a.endpoint("ns", "backend", "generate").started()
    assert sample(a, "troupe_requests_total") == 1
    assert sample(b, "troupe_requests_total") == 0
    assert REGISTRY.get_sample_value("troupe_requests_total", EP) is None


def test_a_second_runtime_metrics_on_one_registry_is_refused() -> None:
    # the collector describes its families, so the registry sees the clash at registration
    # instead of serving a page with duplicate series that Prometheus rejects at scrape
    first = RuntimeMetrics()
    with pytest.raises(ValueError, match="Duplicated timeseries"):
        RuntimeMetrics(registry=first.registry)
