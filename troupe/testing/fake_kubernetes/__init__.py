"""A fake Kubernetes API server for tests of the ``kubernetes`` discovery backend.

No real API server can run on a developer machine or in CI here, so the tests talk to this one
through the real client library (kr8s). It speaks the parts of the real HTTP protocol that
discovery needs (list, watch with resume and 410 Gone, create, replace, delete with
preconditions, merge and JSON patches with resourceVersion preconditions, bearer tokens), for two
namespaced resources: ``endpointslices`` (``discovery.k8s.io/v1``) and the
``dynamoworkermetadatas`` custom resource (``nvidia.com/v1alpha1``). Test hooks change its state
from any thread or event loop. ``python -m troupe.testing.fake_kubernetes --port P`` serves until
interrupted, for process tests and manual experiments (``kubectl`` works against it for these two
resources).

Modules, one per role:

- ``_resources``: the two resources it serves, the discovery documents and selectors.
- ``_wire``: HTTP plumbing of the ASGI app: requests, ``Status`` errors, JSON bodies and lines.
- ``_patch``: merge patches (RFC 7386) and JSON patches (RFC 6902), without I/O.
- ``_store``: the stored objects, the global resourceVersion counter and the event history that
  watches replay.
- ``_app``: the ASGI app: routing, list/get/create/replace/patch/delete and watch streams.
- ``_hooks``: the test hooks (:meth:`FakeKubernetes.set_pod_ready`, ``drop_watches``...).
- ``_server``: :class:`FakeKubernetes` itself: hypercorn in a thread of its own and the
  kubeconfig.
- ``__main__``: the command line.
"""

from troupe.testing.fake_kubernetes._patch import json_patch, merge_patch
from troupe.testing.fake_kubernetes._resources import (
    DWM_GROUP_VERSION,
    DWM_PLURAL,
    ES_GROUP_VERSION,
    ES_PLURAL,
)
from troupe.testing.fake_kubernetes._server import FakeKubernetes

__all__ = [
    "DWM_GROUP_VERSION",
    "DWM_PLURAL",
    "ES_GROUP_VERSION",
    "ES_PLURAL",
    "FakeKubernetes",
    "json_patch",
    "merge_patch",
]

# Reprs and tracebacks show the public path, as before the split.
for _public in (FakeKubernetes, json_patch, merge_patch):
    _public.__module__ = __name__
del _public
