"""Storage locations: paths and URIs, where shards, checkpoints and MLflow artifacts may live on a
cluster, and keeping credentials out of them.

The one set of URI helpers (local path or ``scheme://``): ``is_remote_uri``, ``local_path``,
``resolve_filesystem`` / ``file_info`` (pyarrow filesystem + path), ``uri_for`` (a filesystem path
back as a URI), ``parent_uri`` / ``join_uri`` (relative manifest entries), ``write_bytes``, and
``local_copy`` (a remote file staged on local disk for readers that need a path, e.g. the decoder).

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

Credentials never travel in a URI (``check_no_credentials``, called by every job's config
validation): pyarrow would accept ``s3://KEY:SECRET@bucket/...`` or ``?access_key=..&secret_key=..``,
and the URI would then be printed, logged as an MLflow param, stored in config.json and in
checkpoints. pyarrow's S3/GCS/Azure filesystems and MLflow take credentials from the environment
(AWS_* variables / profiles, MLFLOW_TRACKING_USERNAME/PASSWORD or MLFLOW_TRACKING_TOKEN) or from an
instance / workload identity instead.

Everything printed, logged or stored goes through ``redact_uri`` (or ``redact`` for a config
document). The rule: keep scheme, host, path and the query parameter names; replace userinfo
(``user:password@``) with ``***@``, every query value with ``***`` except the harmless settings
in REDACTION_ALLOWED_PARAMS (region, endpoint_override, scheme), and a ``#fragment`` with
``#***``. It also applies to a local path that carries a query string (``/x/video.mp4?sig=...``),
so failure messages that repeat a path are covered. Only what is shown or stored is redacted: the
jobs keep working with the real URI.
"""
from __future__ import annotations

import contextlib
import errno
import logging
import os
import posixpath
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

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


class CredentialsInURIError(StorageError):
    """A URI that embeds credentials (user:password@host, or access_key=/secret_key=/... parameters)."""


# ----------------------------------------------------------------------------------------------
# Credentials in URIs: refuse them at config validation, redact whatever is shown or stored

# Query values kept by redact_uri: settings that hold no secret and help reading a log.
REDACTION_ALLOWED_PARAMS = frozenset({"region", "endpoint_override", "scheme"})
# Query parameters that carry a credential. Exact names (lower case, "-" read as "_"): pyarrow's
# S3 (access_key, secret_key, session_token) and Azure (account_key, sas_token, client_secret)
# options, their AWS spellings, and the signature parts of pre-signed S3/GCS URLs and Azure SAS.
CREDENTIAL_PARAMS = frozenset({
    "access_key", "secret_key", "session_token", "access_token", "refresh_token", "id_token",
    "aws_access_key_id", "aws_secret_access_key", "aws_session_token", "aws_security_token",
    "account_key", "sas_token", "sas", "client_secret", "sig", "signature", "password", "passwd", "pwd",
    "x_amz_credential", "x_amz_signature", "x_amz_security_token", "x_goog_credential", "x_goog_signature",
    "googleaccessid", "private_key", "api_key", "apikey", "auth", "authorization",
})
# ... and any parameter whose name contains one of these words.
_CREDENTIAL_WORDS = ("secret", "password", "passwd", "credential", "signature", "private_key", "access_key",
                     "account_key", "session_token", "access_token", "api_key")

CREDENTIALS_HINT = (
    "Never put credentials in a URI: it ends up in shell history, process listings, logs, MLflow params and "
    "stored configs. Give them through the environment instead - for S3: AWS_ACCESS_KEY_ID / "
    "AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN or AWS_PROFILE; for an MLflow server: MLFLOW_TRACKING_USERNAME / "
    "MLFLOW_TRACKING_PASSWORD or MLFLOW_TRACKING_TOKEN; for a database: PGPASSWORD or ~/.pgpass - or use an "
    "instance / workload identity (EC2 instance profile, EKS IRSA or Pod Identity, GKE / Azure workload "
    "identity), which needs no secret at all.")

_URI_AUTHORITY = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://([^/?#]*)")
# A URI (scheme://...) or a path inside a message: runs until whitespace, a quote or a bracket.
_TOKEN = re.compile(r"""[^\s'"<>()\[\]{}`]+""")
_USERINFO = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://([^/?#@]*)@")
# user:secret@ where the secret holds a raw "/" (not percent-encoded): no valid URI, still a secret.
_USERINFO_LOOSE = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://[^/?#@]*:[^?#@]*@")
_QUERY_PAIR = re.compile(r"([?&])([^=&#?]*)(=)?([^&#]*)")
# abfs://container@account.dfs.core.windows.net/...: a user part WITHOUT ":" names the container
# (or account), not a credential; "account:KEY@" is one.
_CONTAINER_AT_SCHEMES = frozenset({"abfs", "abfss", "az", "wasb", "wasbs"})


def _param_name(name: str) -> str:
    from urllib.parse import unquote_plus

    return unquote_plus(name).strip().lower().replace("-", "_")


def is_credential_param(name: str) -> bool:
    """Does a query parameter with this name carry a credential (access_key, X-Amz-Signature, ...)?"""
    key = _param_name(name)
    return key in CREDENTIAL_PARAMS or any(word in key for word in _CREDENTIAL_WORDS)


def _query_names(uri: str) -> list[str]:
    """Names of the query parameters (and of key=value pairs in a #fragment) of a URI."""
    rest, _, fragment = uri.partition("#")
    query = rest.split("?", 1)[1] if "?" in rest else ""
    return [pair.split("=", 1)[0] for part in (query, fragment) for pair in part.split("&") if "=" in pair]


def _secret_userinfo(scheme: str, userinfo: str) -> bool:
    return ":" in userinfo or scheme.lower() not in _CONTAINER_AT_SCHEMES


def embedded_credentials(uri: str) -> list[str]:
    """What credentials `uri` embeds, described without their values ([] when none).

    Looks at the userinfo of ``scheme://user:password@host/...`` (a user name alone too - pyarrow
    reads it as the S3 access key - except ``abfs://container@account...``, which names a container)
    and at query parameters named like a credential (CREDENTIAL_PARAMS). A plain path is a local
    file: a ``?`` in it is part of the file name, not a parameter.
    """
    text = str(uri or "").strip()
    found: list[str] = []
    match = _URI_AUTHORITY.match(text)
    if not match:
        return found
    scheme, authority = match.groups()
    userinfo = _USERINFO.match(text)
    if (userinfo and _secret_userinfo(scheme, userinfo.group(2))) or (not userinfo and _USERINFO_LOOSE.match(text)):
        found.append("user info (user:password@ before the host)")
    names = sorted({_param_name(n) for n in _query_names(text) if is_credential_param(n)})
    if names:
        found.append("query parameter(s) " + ", ".join(names))
    return found


def check_no_credentials(uri: str, what: str) -> None:
    """Raise CredentialsInURIError when `uri` embeds credentials; `what` names the setting (e.g. "--input").

    The message shows the URI redacted, never the secret.
    """
    found = embedded_credentials(uri)
    if found:
        raise CredentialsInURIError(f"{what} {redact_uri(str(uri))} embeds credentials ({'; '.join(found)}). "
                                    + CREDENTIALS_HINT)


def _redact_query(query_part: str) -> str:
    """'?a=1&token=x#frag' -> '?a=1&token=***#***' (REDACTION_ALLOWED_PARAMS keep their values)."""
    fragment = ""
    if "#" in query_part:
        query_part, fragment = query_part.split("#", 1)
        fragment = "#***" if fragment else "#"

    def pair(m: re.Match) -> str:
        sep, name, eq, value = m.groups()
        if not eq or _param_name(name) in REDACTION_ALLOWED_PARAMS:
            return m.group(0)
        return f"{sep}{name}={'***' if value else ''}"

    return _QUERY_PAIR.sub(pair, query_part) + fragment


def _redact_token(token: str) -> str:
    """One URI or path (no whitespace) with userinfo, query values and fragment redacted."""
    userinfo = _USERINFO.match(token)
    if userinfo and _secret_userinfo(userinfo.group(1), userinfo.group(2)):
        token = f"{userinfo.group(1)}://***@{token[userinfo.end():]}"
    elif not userinfo and (loose := _USERINFO_LOOSE.match(token)):
        token = f"{loose.group(1)}://***@{token[loose.end():]}"
    cut = token.find("?")
    if cut >= 0:
        return token[:cut] + _redact_query(token[cut:])
    if "://" in token and "#" in token:  # a fragment may hold a token too (OAuth implicit flow)
        head, fragment = token.split("#", 1)
        return head + ("#***" if fragment else "#")
    return token


def redact_uri(text: Any) -> str:
    """`text` - one URI, or a message / line / document holding any number of URIs and paths - with
    the secret parts of each replaced by ``***`` (see the module doc for the rule). Idempotent; text
    without "@", "?" or "#" comes back unchanged."""
    text = "" if text is None else str(text)
    if "@" not in text and "?" not in text and "#" not in text:
        return text
    return _TOKEN.sub(lambda m: _redact_token(m.group(0)), text)


def redacting_printer(printer: Callable[[str], Any] = print) -> Callable[[str], Any]:
    """`printer` with every line passed through redact_uri first (wrapping twice is harmless)."""
    if getattr(printer, "_redacts", False):
        return printer

    def redacted(line: Any) -> Any:
        return printer(redact_uri(line))

    redacted._redacts = True  # type: ignore[attr-defined]
    return redacted


class RedactingFilter(logging.Filter):
    """A logging filter that redacts URIs in every record it sees (message and arguments merged)."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a malformed record: leave it to logging's own error handling
            return True
        redacted = redact_uri(message)
        if redacted != message:
            record.msg, record.args = redacted, ()
        return True


def install_log_redaction(logger: logging.Logger | None = None) -> None:
    """Redact URIs in everything the handlers of `logger` (default: the root logger) write.

    Jobs call it after logging.basicConfig: library warnings that repeat a location (a lock's path,
    a failed read) then never print a URI's secret. Idempotent.
    """
    logger = logger or logging.getLogger()
    for handler in logger.handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())


def redact(value: Any) -> Any:
    """A config document (nested dict / list / tuple of str, numbers, ...) with redact_uri applied to
    every string value (keys kept): what config.json, summary.json, checkpoints and MLflow get."""
    if isinstance(value, str):
        return redact_uri(value)
    if isinstance(value, Mapping):
        return {k: redact(v) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v) for v in value]
    if isinstance(value, tuple):
        return tuple(redact(v) for v in value)
    return value


def _scheme(uri: str) -> str | None:
    m = _SCHEME.match(str(uri))
    return m.group(1).lower() if m else None


def is_remote_uri(uri: str) -> bool:
    """True for ``scheme://...`` URIs other than ``file://`` (s3, gs, gcs, abfs(s), hdfs, ...)."""
    scheme = _scheme(str(uri))
    return scheme is not None and scheme not in _LOCAL_SCHEMES


def local_path(uri: str) -> str:
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
        return pafs.LocalFileSystem(), local_path(uri)
    try:
        fs, path = pafs.FileSystem.from_uri(str(uri))
    except Exception as exc:  # pyarrow raises ArrowInvalid / OSError / ValueError
        # pyarrow's message repeats the URI, which may carry user:password@ or ?keys=...
        detail = re.sub(r"(://)[^/@\s]*@", r"\1***@", str(exc).replace(str(uri), redact_uri(uri)))
        raise StorageError(f"cannot open storage {redact_uri(uri)}: {detail}") from None
    return fs, path


def file_info(uri: str) -> tuple[pafs.FileSystem, str, pafs.FileInfo]:
    """(filesystem, path inside it, what is there) for `uri`; StorageError when the store cannot be reached."""
    fs, path = resolve_filesystem(uri)
    try:
        return fs, path, fs.get_file_info(path)
    except Exception as exc:  # pyarrow raises OSError / ArrowInvalid (no network, no permission, ...)
        raise StorageError(f"cannot reach {redact_uri(uri)}: {redact_uri(exc)}") from exc


def uri_for(like: str, fs_path: str) -> str:
    """A path inside the filesystem of `like` (what resolve_filesystem / a listing gives) back as
    something resolve_filesystem and the decoder open: the path itself locally, scheme://path remotely."""
    return f"{_scheme(like)}://{fs_path}" if is_remote_uri(like) else fs_path


def parent_uri(uri: str) -> str:
    """The folder holding `uri`: scheme://bucket/a for scheme://bucket/a/b, an absolute path locally."""
    return posixpath.dirname(str(uri).rstrip("/")) if _scheme(uri) else os.path.dirname(os.path.abspath(uri))


def join_uri(base: str, relative: str) -> str:
    """`relative` (a manifest's uri column, say) under folder `base`; a URI or an absolute path stays as it is."""
    if _scheme(relative) or os.path.isabs(relative):
        return relative
    if _scheme(base):
        return posixpath.join(base, relative)
    return os.path.normpath(os.path.join(base, relative))


def write_bytes(uri: str, data: bytes) -> None:
    """Write `data` to the file `uri` (local or remote), creating its folder."""
    fs, path = resolve_filesystem(uri)
    parent = posixpath.dirname(path)
    if parent:
        fs.create_dir(parent, recursive=True)
    with fs.open_output_stream(path) as out:
        out.write(data)


@contextlib.contextmanager
def local_copy(uri: str, prefix: str = "staged_", default_suffix: str = "") -> Iterator[str]:
    """A local path for `uri`: the file itself, or a temporary copy of a remote object (for readers
    that need a path, e.g. decord), deleted when the context exits (also when the reader fails or a
    generator using it is closed early).

    FileNotFoundError (`filename` = uri) when nothing is there; StorageError when the store cannot be
    reached or the copy fails.
    """
    uri = os.fspath(uri)
    if not is_remote_uri(uri):
        path = local_path(uri)
        if not os.path.isfile(path):
            raise FileNotFoundError(errno.ENOENT, "file not found", uri)
        yield path
        return
    fs, remote_path, info = file_info(uri)
    if info.type != pafs.FileType.File:
        raise FileNotFoundError(errno.ENOENT, "file not found", uri)
    fd, staged = tempfile.mkstemp(prefix=prefix, suffix=os.path.splitext(remote_path)[1] or default_suffix)
    try:
        try:
            with os.fdopen(fd, "wb") as out, fs.open_input_stream(remote_path) as src:
                shutil.copyfileobj(src, out, length=8 << 20)
        except Exception as exc:
            raise StorageError(f"cannot copy {redact_uri(uri)} to local disk: {redact_uri(exc)}") from exc
        yield staged
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(staged)


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
    return [os.path.realpath(local_path(p)) for p in raw.split(os.pathsep) if p.strip()]


def is_shared_path(uri: str, mounts_file: str = "/proc/mounts") -> bool:
    """Would every node of a cluster see this location?

    Remote URIs: yes. Local paths: yes when on a network filesystem or under a prefix listed in
    HMHN_SHARED_PATHS; otherwise (ext4, xfs, overlay, tmpfs, ...) no. Symlinks are resolved
    first, so a link from a local folder into an NFS mount counts as shared.
    """
    if is_remote_uri(uri):
        return True
    path = os.path.realpath(local_path(uri))
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
    path = local_path(uri)
    fstype = mount_fstype(os.path.realpath(path)) or "unknown"
    raise StorageError(
        f"{purpose} {path} is a node-local path but the cluster has {node_count} nodes: "
        f"tasks on the other nodes would read or write their own disks (filesystem type here: "
        f"{fstype}). Use s3://bucket/prefix (or gs://, abfs://, hdfs://), an NFS mount present "
        f"on every node, or list the mount in {SHARED_PATHS_ENV} "
        f"({os.pathsep!r}-separated) if it is shared but not detectable."
    )
