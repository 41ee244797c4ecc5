"""Where shards, checkpoints and MLflow artifacts may live when a job runs on a cluster.

On one machine any folder works. On a cluster, Ray Data write tasks, Ray Train workers and
MLflow's rank-0 process run on *other* nodes than the driver, so every location they read or
write must be storage that every node sees:

* a remote URI handled by a pyarrow filesystem: ``s3://``, ``gs://``, ``abfs://``, ``hdfs://`` ...
* a local path on a network filesystem mounted on every node (NFS, CIFS/SMB, Lustre, CephFS,
  GlusterFS, FUSE mounts such as s3fs/gcsfuse/mountpoint-s3 ...), found in ``/proc/mounts``;
* a local path under a prefix listed in ``HMHN_SHARED_PATHS`` (``os.pathsep``-separated), for
  admins whose shared mount cannot be detected (e.g. a bind mount of an NFS share inside a
  container, where /proc/mounts shows ``overlay`` or ``ext4``).

``require_shared_storage`` is what the jobs call: it refuses a node-local path as soon as the
cluster has more than one alive node, with a message that says what to use instead.
Nothing here reads or logs credentials: pyarrow's S3/GCS/Azure filesystems take them from the
environment / instance metadata as usual.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import pyarrow.fs as pafs

SHARED_PATHS_ENV = "HMHN_SHARED_PATHS"

# Filesystem types (third column of /proc/mounts) that several machines can mount at once.
NETWORK_FS_TYPES = frozenset({
    "nfs", "nfs4", "cifs", "smb3", "smbfs", "lustre", "ceph", "glusterfs", "gpfs",
    "beegfs", "afs", "ocfs2", "gfs2", "panfs", "wekafs", "orangefs", "pvfs2", "quobyte",
    "alluxio", "juicefs", "efs",
})
# fuse.<name> is treated as shared (s3fs, gcsfuse, sshfs, mountpoint-s3, juicefs, ...) except
# these FUSE filesystems that only ever show the local machine.
LOCAL_FUSE_TYPES = frozenset({
    "fuse.lxcfs", "fuse.gvfsd-fuse", "fuse.portal", "fuse.snapfuse", "fuse.fuse-overlayfs",
    "fuse.squashfuse", "fuse.appimaged", "fuse.bindfs",
})

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")
_LOCAL_SCHEMES = frozenset({"file", "local"})


class StorageError(ValueError):
    """A storage location that cannot work for this run (e.g. node-local on a cluster)."""


def _scheme(uri: str) -> str | None:
    m = _SCHEME.match(str(uri))
    return m.group(1).lower() if m else None


def is_remote_uri(uri: str) -> bool:
    """True for ``scheme://...`` URIs other than ``file://`` (s3, gs, gcs, abfs(s), hdfs, ...)."""
    scheme = _scheme(str(uri))
    return scheme is not None and scheme not in _LOCAL_SCHEMES


def _local_path(uri: str) -> str:
    """Absolute, normalised local path for a plain path or a ``file://`` URI."""
    text = str(uri)
    scheme = _scheme(text)
    if scheme in _LOCAL_SCHEMES:
        text = text[len(scheme) + 3:]
        if text and not text.startswith("/"):  # file://host/path: drop the (local) host part
            text = "/" + text.split("/", 1)[1] if "/" in text else "/"
    return os.path.abspath(os.path.expanduser(text))


def resolve_filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """(pyarrow filesystem, path inside it) for a local path, ``file://`` or remote URI.

    Remote URIs go through ``pyarrow.fs.FileSystem.from_uri`` (which may look up e.g. an S3
    bucket's region; pass ``?region=...`` to avoid that). Errors become StorageError.
    """
    if not str(uri):
        raise StorageError("empty storage location")
    if not is_remote_uri(uri):
        return pafs.LocalFileSystem(), _local_path(uri)
    try:
        fs, path = pafs.FileSystem.from_uri(str(uri))
    except Exception as exc:  # pyarrow raises ArrowInvalid / OSError / ValueError
        # pyarrow's message repeats the URI, which may carry user:password@ or ?keys=...
        detail = re.sub(r"(://)[^/@\s]*@", r"\1***@", str(exc).replace(str(uri), _redact(uri)))
        raise StorageError(f"cannot open storage {_redact(uri)}: {detail}") from None
    return fs, path


def _redact(uri: str) -> str:
    """Drop a ``user:password@`` part and the query string (may hold keys) from a URI for messages."""
    text = re.sub(r"(://)[^/@]*@", r"\1***@", str(uri))
    return text.split("?", 1)[0]


def _unescape_mount(field: str) -> str:
    # /proc/mounts escapes space, tab, newline and backslash as \040, \011, \012, \134
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def read_mounts(mounts_file: str = "/proc/mounts") -> list[tuple[str, str]]:
    """[(mount point, fs type)] from /proc/mounts; empty if it cannot be read (non-Linux)."""
    try:
        text = Path(mounts_file).read_text()
    except OSError:
        return []
    out = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 3:
            out.append((_unescape_mount(parts[1]), parts[2]))
    return out


def _is_under(path: str, prefix: str) -> bool:
    prefix = prefix.rstrip("/") or "/"
    return prefix == "/" or path == prefix or path.startswith(prefix + "/")


def mount_fstype(path: str, mounts_file: str = "/proc/mounts") -> str | None:
    """Filesystem type of the mount holding `path` (longest mount-point prefix wins)."""
    best, best_type = "", None
    for point, fstype in read_mounts(mounts_file):
        if _is_under(path, point) and len(point) >= len(best):
            best, best_type = point, fstype
    return best_type


def _is_network_fstype(fstype: str | None) -> bool:
    if not fstype:
        return False
    fstype = fstype.lower()
    if fstype in NETWORK_FS_TYPES:
        return True
    return fstype.startswith("fuse.") and fstype not in LOCAL_FUSE_TYPES


def configured_shared_prefixes() -> list[str]:
    """Absolute real paths listed in HMHN_SHARED_PATHS (empty entries ignored)."""
    raw = os.environ.get(SHARED_PATHS_ENV, "")
    return [os.path.realpath(_local_path(p)) for p in raw.split(os.pathsep) if p.strip()]


def is_shared_path(uri: str, mounts_file: str = "/proc/mounts") -> bool:
    """Would every node of a cluster see this location?

    Remote URIs: yes. Local paths: yes when on a network filesystem or under a prefix listed in
    HMHN_SHARED_PATHS; otherwise (ext4, xfs, overlay, tmpfs, ...) no. Symlinks are resolved
    first, so a link from a local folder into an NFS mount counts as shared.
    """
    if is_remote_uri(uri):
        return True
    path = os.path.realpath(_local_path(uri))
    if any(_is_under(path, prefix) for prefix in configured_shared_prefixes()):
        return True
    return _is_network_fstype(mount_fstype(path, mounts_file))


def _default_node_count() -> int:
    """Alive nodes of the Ray cluster this process uses (connects first if RAY_ADDRESS is set)."""
    import ray

    from pipeline.ray_utils import alive_node_count, init_ray

    if not ray.is_initialized():
        if not os.environ.get("RAY_ADDRESS"):
            return 1  # the job will start a private single-node Ray instance
        init_ray()
    return alive_node_count()


def require_shared_storage(uri: str, purpose: str, node_count: int | None = None) -> None:
    """Raise StorageError if `uri` is node-local while the Ray cluster has more than one node.

    `purpose` names the setting in the message, e.g. ``"--output"`` or ``"--storage-path"``.
    `node_count` defaults to the number of alive nodes of the connected Ray cluster.
    """
    if node_count is None:
        node_count = _default_node_count()
    if node_count <= 1 or is_shared_path(uri):
        return
    path = _local_path(uri)
    fstype = mount_fstype(os.path.realpath(path)) or "unknown"
    raise StorageError(
        f"{purpose} {path} is a node-local path but the cluster has {node_count} nodes: "
        f"tasks on the other nodes would read or write their own disks (filesystem type here: "
        f"{fstype}). Use s3://bucket/prefix (or gs://, abfs://, hdfs://), an NFS mount present "
        f"on every node, or list the mount in {SHARED_PATHS_ENV} "
        f"({os.pathsep!r}-separated) if it is shared but not detectable."
    )
