"""Start the Ray that a local study (or a local `--loader ray` trial) runs on: loopback only.

A plain `ray.init()` on Linux binds the GCS, the raylet (node manager and object manager),
every core worker (driver included), the dashboard agent, the runtime-env agent and the
metrics exporters to every interface (`*`, `0.0.0.0`, `::`). Passing
`_node_ip_address="127.0.0.1"` alone does not help with the pinned Ray (2.60): on Linux
`ray.init` "resolves" a loopback node address to the machine's routable address
(`services.resolve_ip_for_localhost`) before it starts anything.

What decides it is Ray's `ENABLE_RAY_CLUSTER` (`ray._private.ray_constants`, set from the env
var RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER when Ray is imported; true on Linux). With it false, the
node address stays 127.0.0.1, and every Ray server then listens on loopback: the C++ gRPC
servers (GCS, raylet, core workers) bind 127.0.0.1 when their node address is 127.0.0.1, the
agents and metrics exporters bind the node address, the dashboard (if any) binds
`dashboard_host` (127.0.0.1 by default). Nothing else changes: that constant is read only to
pick this node's address. So a local start sets it false around `ray.init(_node_ip_address=
"127.0.0.1")`; a cluster (RAY_ADDRESS set, e.g. inside `ray job submit`) is joined with a plain
`ray.init()` and binds whatever the cluster was started with (docs/cluster.md).

Ray's token authentication (RAY_AUTH_MODE, on by default for a local `ray.init()` in 2.60) is
left as the user set it: loopback-only listeners are the protection against other machines;
the token still guards against other users of the same machine.
"""

from __future__ import annotations

import os

LOCALHOST = "127.0.0.1"


def is_cluster() -> bool:
    """True when the driver joins an existing Ray (RAY_ADDRESS, as `ray job submit` sets)."""
    return bool(os.environ.get("RAY_ADDRESS"))


def init_local_ray(**kwargs) -> None:
    """`ray.init(**kwargs)` for a new local Ray whose every listening socket is on 127.0.0.1."""
    import ray
    from ray._private import ray_constants

    kwargs.setdefault("include_dashboard", False)
    kwargs.setdefault("dashboard_host", LOCALHOST)
    before = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False  # keep 127.0.0.1 as the node address
    try:
        ray.init(_node_ip_address=LOCALHOST, **kwargs)
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = before
    address = ray.util.get_node_ip_address()
    if address != LOCALHOST:  # a Ray release that resolves the address some other way
        ray.shutdown()
        raise RuntimeError(f"local Ray came up on {address}, not {LOCALHOST}: refusing to run "
                           "a local study that listens beyond loopback")


def ensure_ray(**kwargs) -> None:
    """Join the cluster when RAY_ADDRESS is set (a cluster decides its own resources and
    binds), else start a loopback-only local Ray; nothing when Ray is already up."""
    import ray

    if ray.is_initialized():
        return
    if is_cluster():
        ray.init()  # never pass num_cpus etc. to an existing cluster
    else:
        init_local_ray(**kwargs)
