"""`troupe worker` / `call` / `instances` with DYN_DISCOVERY_BACKEND=kubernetes, across processes.

The fake API server runs in this process; the worker and the commands are child processes that
reach it through the kubeconfig, as they would reach a real cluster. A worker is reachable while
its pod is ready in an EndpointSlice, and disappears when the slice marks it not ready.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from troupe.testing._wait import eventually
from troupe.testing.fake_kubernetes import DWM_PLURAL, FakeKubernetes

NAMESPACE = "inference"
POD = "words-worker-0"


@pytest.fixture
def env(fresh_fake_kubernetes: FakeKubernetes) -> dict[str, str]:
    clean = dict(os.environ)  # already scrubbed of troupe variables by conftest._scrub_env
    return clean | {
        "DYN_DISCOVERY_BACKEND": "kubernetes",
        "KUBECONFIG": str(fresh_fake_kubernetes.kubeconfig),
        "POD_NAMESPACE": NAMESPACE,
        "DYN_REQUEST_PLANE": "tcp",
        "DYN_TCP_RPC_HOST": "127.0.0.1",
        "DYN_LEASE_TTL": "1",
        "DYN_LOG": "warning",
    }


def troupe(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "troupe", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
        check=False,
    )


def instances(env: dict[str, str]) -> list[dict[str, object]]:
    result = troupe(env, "instances", "demo", "--json")
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


def test_a_worker_is_callable_while_its_pod_is_ready(
    env: dict[str, str], fresh_fake_kubernetes: FakeKubernetes
) -> None:
    fake = fresh_fake_kubernetes
    worker_env = env | {"POD_NAME": POD, "POD_UID": "6f1c0c2e-0000-4000-8000-000000000001"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "troupe", "worker", "demo.backend.words", "troupe.demo:words"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=worker_env,
    )
    try:
        assert proc.stderr is not None
        banner = proc.stderr.readline()
        assert "serving demo.backend.words at tcp://127.0.0.1:" in banner, banner
        resource = eventually(lambda: fake.get_resource(NAMESPACE, DWM_PLURAL, POD), timeout=10)
        [(key, entry)] = resource["spec"]["instances"].items()
        assert key.startswith("/services/demo/backend/words/")
        assert entry["record"]["pid"] == proc.pid
        assert resource["metadata"]["ownerReferences"][0]["name"] == POD
        assert instances(env) == []  # registered, but the pod is not ready yet

        fake.set_pod_ready(NAMESPACE, POD, True)
        called = troupe(env, "call", "demo.backend.words", '{"text": "hello kube"}', "--wait", "10")
        assert called.returncode == 0, called.stderr
        words = [json.loads(line)["word"] for line in called.stdout.splitlines()]
        assert words == ["hello", "kube"]

        fake.set_pod_ready(NAMESPACE, POD, False)
        assert instances(env) == []
        refused = troupe(env, "call", "demo.backend.words", '{"text": "x"}', "--wait", "0")
        assert refused.returncode != 0
        assert "no instances" in refused.stderr.lower(), refused.stderr

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        # A clean stop revokes: the resource is gone at once, not with the pod.
        assert fake.get_resource(NAMESPACE, DWM_PLURAL, POD) is None
    finally:
        proc.kill()
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
        if proc.stderr is not None:
            proc.stderr.close()


def test_several_worker_processes_in_one_pod_are_all_registered(
    env: dict[str, str], fresh_fake_kubernetes: FakeKubernetes
) -> None:
    # `troupe worker --workers 2`: two runtimes share the pod and its resource; neither's first
    # write drops the other's registration.
    fake = fresh_fake_kubernetes
    fake.set_pod_ready(NAMESPACE, POD, True)
    worker_env = env | {"POD_NAME": POD, "POD_UID": "6f1c0c2e-0000-4000-8000-000000000002"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "troupe",
            "worker",
            "demo.backend.words",
            "troupe.demo:words",
            "--workers",
            "2",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=worker_env,
    )
    try:

        def registered() -> list[str]:
            resource = fake.get_resource(NAMESPACE, DWM_PLURAL, POD)
            return sorted((resource or {}).get("spec", {}).get("instances", {}))

        keys = eventually(lambda: len(registered()) == 2 and registered(), timeout=20)
        found = eventually(lambda: len(instances(env)) == 2 and instances(env), timeout=10)
        assert sorted(f"/services/demo/backend/words/{i['instance_id']}" for i in found) == keys
        assert registered() == keys  # still both, after several keep-alive periods

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
        assert fake.get_resource(NAMESPACE, DWM_PLURAL, POD) is None  # both revoked
    finally:
        proc.kill()
        proc.wait()
