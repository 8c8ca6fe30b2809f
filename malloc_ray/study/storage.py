"""Where a study writes, and the check that every node of a Ray cluster can reach it.

Trials run on whichever node Ray picks. Each one writes its result file, its checkpoint and its
MLflow child run, and Ray Tune syncs its experiment state to `storage_path`. On a multi-node
cluster a plain local path names a different disk on every node: results land where the driver
never looks, post-hoc methods miss the Native checkpoint, and resume loses cells. So the study
refuses to start on such a cluster unless each place it writes is either a remote URI
(s3://, gs://, http://, ...) or a local path the user declared to be a shared mount (NFS)
mounted at the same path on every node.
"""

from __future__ import annotations

import re
from pathlib import Path

from malloc_ray.errors import InputError

# A URI scheme of two or more characters: one letter would be a Windows drive ("C:/...").
_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+://")
# URI schemes that still name a file on the local disk of whichever node opens them.
_LOCAL_SCHEMES = ("file", "sqlite")
_REMOTE_NAMES = ("databricks",)  # MLflow tracking URIs that are a bare name, no "://"


def tune_storage_path(spec) -> str:
    """What Ray Tune's RunConfig gets: the spec's URI or absolute path, else <study>/ray_results."""
    storage_path = spec.storage_path
    if not storage_path:
        return str(spec.study_dir / "ray_results")
    if _URI.match(storage_path):
        return storage_path
    return str(Path(storage_path).expanduser().resolve())  # Tune wants absolute paths


def is_local(location: str) -> bool:
    """True when `location` (a path or URI) is a file on the disk of the node that opens it."""
    if not _URI.match(location):
        return location not in _REMOTE_NAMES
    return location.split(":", 1)[0].lower() in _LOCAL_SCHEMES


def alive_nodes(nodes: list[dict]) -> list[dict]:
    return [n for n in nodes if n.get("Alive", n.get("alive", False))]


def check_shared_storage(storage_path: str, nodes: list[dict], *, study_dir: str | Path,
                         tracking_uri: str, shared: bool = False) -> None:
    """Raise InputError when more than one node is alive and a place the study writes to is
    a local path not declared shared. `nodes` is `ray.nodes()`."""
    count = len(alive_nodes(nodes))
    if count <= 1 or shared:
        return  # one node sees its own disk; a declared shared mount is the user's promise
    problems = [f"the study directory {study_dir} (trial results, checkpoints) is local"]
    if is_local(storage_path):
        problems.append(f"Ray Tune's storage_path {storage_path} is local")
    if is_local(tracking_uri):
        problems.append(f"the MLflow tracking URI {tracking_uri} is a local file")
    raise InputError(
        f"this Ray cluster has {count} alive nodes, but " + "; ".join(problems) + ", so trials "
        "on other nodes would write to their own disks. Set output_dir (spec key or "
        "--output-dir) to a directory on a volume mounted at the same path on every node "
        "(e.g. NFS) and declare it with `shared_storage: true` in the spec or "
        "--shared-storage. storage_path (spec key or --storage-path) may instead be an s3:// "
        "or gs:// URI, and MLFLOW_TRACKING_URI an MLflow server (http://...). "
        "See clusters/README.md", key="storage_path")


def check_cluster_storage(spec, tracking_uri: str) -> None:
    """`check_shared_storage` against the running Ray cluster (call after ray.init)."""
    import ray

    check_shared_storage(tune_storage_path(spec), ray.nodes(),
                         study_dir=spec.study_dir, tracking_uri=tracking_uri,
                         shared=spec.shared_storage)
