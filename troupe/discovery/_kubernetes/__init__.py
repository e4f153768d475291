"""The ``kubernetes`` store: discovery through the Kubernetes API, with no etcd of our own.

Each pod writes one ``DynamoWorkerMetadata`` custom resource (``nvidia.com/v1alpha1``) named
after the pod and owned by it, so Kubernetes deletes it with the pod; its spec holds the pod's
keys and a renewal record per lease of the processes writing it. A key is visible only while
that pod is ready in an EndpointSlice of the namespace: the pod's life is the real lease.

Modules, one per role:

- ``_spec``: the resource's layout, without I/O: the spec entries of keys and leases, reading
  them back, stale leases, and the JSON patches (with their resourceVersion precondition) that
  write them.
- ``_client``: the requests to the API server through kr8s (loaded on first use), with kr8s and
  httpx errors translated, and the retries of optimistic writes that meet 409 Conflict.
- ``_watch``: the visible set (resources gated by EndpointSlice readiness) and the list/watch
  loop that turns both resources' streams into ``Put``/``Delete`` events, resuming after a
  dropped stream and relisting after 410 Gone.
- ``_store``: :class:`KubernetesStore`: connection, this pod's identity (``POD_*`` variables or
  the service account), per-process leases, writes and reads.
"""

from troupe.discovery._kubernetes._spec import (
    DWM_GROUP_VERSION,
    DWM_KIND,
    DWM_PLURAL,
    ES_GROUP_VERSION,
    ES_PLURAL,
)
from troupe.discovery._kubernetes._store import KubernetesStore
from troupe.discovery._kubernetes._watch import _View as _View  # tests look at the visible set

__all__ = [
    "DWM_GROUP_VERSION",
    "DWM_KIND",
    "DWM_PLURAL",
    "ES_GROUP_VERSION",
    "ES_PLURAL",
    "KubernetesStore",
]

# Reprs and tracebacks show the path the rest of troupe imports, as before the split.
KubernetesStore.__module__ = __name__
