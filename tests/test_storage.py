"""pipeline.storage: which locations every node of a cluster sees, and refusing the others."""
from __future__ import annotations

import os

import pyarrow.fs as pafs
import pytest

from pipeline import storage
from pipeline.storage import (StorageError, is_remote_uri, is_shared_path,
                              require_shared_storage, resolve_filesystem)


@pytest.fixture(autouse=True)
def _no_shared_paths(monkeypatch):
    monkeypatch.delenv(storage.SHARED_PATHS_ENV, raising=False)


def test_remote_and_local_uris():
    assert is_remote_uri("s3://bucket/faces")
    assert is_remote_uri("gs://bucket/x") and is_remote_uri("abfss://c@acct.dfs.core.windows.net/x")
    assert is_remote_uri("hdfs://namenode:8020/data")
    assert not is_remote_uri("/data/faces")
    assert not is_remote_uri("relative/dir")
    assert not is_remote_uri("file:///data/faces")
    assert not is_remote_uri("C:relative")  # no "://": not a URI


def test_resolve_local_paths_and_file_uris(tmp_path, monkeypatch):
    fs, path = resolve_filesystem(str(tmp_path / "a"))
    assert isinstance(fs, pafs.LocalFileSystem) and path == str(tmp_path / "a")
    fs, path = resolve_filesystem(f"file://{tmp_path}/b")
    assert isinstance(fs, pafs.LocalFileSystem) and path == f"{tmp_path}/b"
    monkeypatch.chdir(tmp_path)
    fs, path = resolve_filesystem("rel/c")
    assert path == str(tmp_path / "rel" / "c")  # made absolute: workers have another cwd
    # really usable: write and read back through the filesystem
    with fs.open_output_stream(str(tmp_path / "x.bin")) as f:
        f.write(b"ok")
    assert (tmp_path / "x.bin").read_bytes() == b"ok"


def test_resolve_s3_uri_without_network():
    # an explicit region keeps pyarrow from asking AWS where the bucket lives
    fs, path = resolve_filesystem("s3://my-bucket/faces/v1?region=eu-west-1")
    assert isinstance(fs, pafs.S3FileSystem)
    assert path == "my-bucket/faces/v1"
    assert fs.region == "eu-west-1"


def test_resolve_unknown_scheme_is_a_storage_error():
    with pytest.raises(StorageError, match="cannot open storage nosuchfs://"):
        resolve_filesystem("nosuchfs://user:secret@host/x?key=hidden")
    try:
        resolve_filesystem("nosuchfs://user:secret@host/x?key=hidden")
    except StorageError as exc:  # never echo credentials
        assert "secret" not in str(exc) and "hidden" not in str(exc)


def test_local_tmp_dir_is_not_shared_but_remote_is(tmp_path):
    assert not is_shared_path(str(tmp_path))
    assert is_shared_path("s3://bucket/ckpt")


def test_refused_on_two_nodes_for_a_local_path(tmp_path):
    with pytest.raises(StorageError) as info:
        require_shared_storage(str(tmp_path / "faces"), "--output", node_count=2)
    msg = str(info.value)
    assert msg.startswith(f"--output {tmp_path / 'faces'} is a node-local path")
    assert "cluster has 2 nodes" in msg
    assert "s3://" in msg and "NFS" in msg and "HMHN_SHARED_PATHS" in msg
    assert isinstance(info.value, ValueError)


def test_accepted_when_listed_in_hmhn_shared_paths(tmp_path, monkeypatch):
    other = tmp_path / "elsewhere"
    shared = tmp_path / "shared"
    shared.mkdir()
    monkeypatch.setenv(storage.SHARED_PATHS_ENV, os.pathsep.join(["", str(other), str(shared)]))
    require_shared_storage(str(shared / "faces" / "v1"), "--output", node_count=3)
    require_shared_storage(f"file://{shared}", "--output", node_count=3)
    # a sibling whose name merely starts with the prefix is not under it
    with pytest.raises(StorageError):
        require_shared_storage(str(tmp_path / "shared-not"), "--output", node_count=3)


def test_symlink_into_shared_prefix_counts_as_shared(tmp_path, monkeypatch):
    shared = tmp_path / "nfs"
    shared.mkdir()
    link = tmp_path / "link"
    link.symlink_to(shared)
    monkeypatch.setenv(storage.SHARED_PATHS_ENV, str(shared))
    assert is_shared_path(str(link / "x"))


def test_accepted_on_a_single_node_and_for_remote(tmp_path):
    require_shared_storage(str(tmp_path), "--output", node_count=1)
    require_shared_storage("s3://bucket/faces", "--output", node_count=5)


def test_default_node_count_without_ray_is_one(tmp_path, monkeypatch):
    import ray

    # Whatever other tests of this session left connected, this process "has no Ray yet".
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    require_shared_storage(str(tmp_path), "--output")  # no cluster: a private 1-node Ray


def test_network_filesystems_from_a_mounts_table(tmp_path):
    mounts = tmp_path / "mounts"
    mounts.write_text(
        "overlay / overlay rw 0 0\n"
        "server:/export /mnt/nfs nfs4 rw 0 0\n"
        "/dev/sdb1 /mnt/nfs/local-cache ext4 rw 0 0\n"
        "s3fs /mnt/s3 fuse.s3fs rw 0 0\n"
        "lxcfs /var/lib/lxcfs fuse.lxcfs rw 0 0\n"
        "//srv/share /mnt/with\\040space cifs rw 0 0\n"
    )
    m = str(mounts)
    assert is_shared_path("/mnt/nfs/faces", mounts_file=m)
    assert not is_shared_path("/mnt/nfs/local-cache/x", mounts_file=m)  # longest prefix wins
    assert not is_shared_path("/mnt/nfsx", mounts_file=m)
    assert is_shared_path("/mnt/s3/bucket", mounts_file=m)
    assert not is_shared_path("/var/lib/lxcfs/proc", mounts_file=m)
    assert is_shared_path("/mnt/with space/a", mounts_file=m)
    assert not is_shared_path("/home/me/data", mounts_file=m)
