"""pipeline.storage against a real S3-compatible server (moto, on 127.0.0.1 only): from the test
process, from Ray tasks (via runtime_env and via inherited env), and Parquet round trips.

The URIs are plain ``s3://bucket/key``: the endpoint and dummy keys come from the environment
(tests/s3_server.py explains the mechanism and why anonymous access is not used).
"""
from __future__ import annotations

import os
import uuid

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from pipeline.storage import resolve_filesystem

pytestmark = pytest.mark.timeout(300)


def _prefix(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:8]}"


def roundtrip(uri_dir: str) -> dict:
    """put / get / list / delete under `uri_dir` through resolve_filesystem; returns what it saw.

    Module-level so that Ray can ship it to a worker (tests/ is importable there).
    """
    from pipeline.storage import resolve_filesystem

    fs, base = resolve_filesystem(uri_dir)
    assert isinstance(fs, pafs.S3FileSystem)
    payloads = {"a.bin": b"alpha\x00\x01" * 100, "sub/b.txt": b"beta"}
    for name, data in payloads.items():
        with fs.open_output_stream(f"{base}/{name}") as f:
            f.write(data)
    got = {name: fs.open_input_stream(f"{base}/{name}").read() for name in payloads}
    listed = sorted(i.path[len(base) + 1:] for i in fs.get_file_info(
        pafs.FileSelector(base, recursive=True)) if i.type == pafs.FileType.File)
    fs.delete_file(f"{base}/a.bin")
    after_delete = fs.get_file_info(f"{base}/a.bin").type
    fs.delete_dir(base)
    gone = fs.get_file_info(pafs.FileSelector(base, allow_not_found=True, recursive=True))
    return {"ok": got == payloads, "listed": listed, "deleted": after_delete == pafs.FileType.NotFound,
            "left": [i.path for i in gone], "pid": os.getpid()}


def _check(result: dict) -> None:
    assert result["ok"], "objects read back differ from what was written"
    assert result["listed"] == ["a.bin", "sub/b.txt"]
    assert result["deleted"] and result["left"] == []


def test_put_get_list_delete_from_the_test_process(s3_server):
    assert s3_server.endpoint.startswith("http://127.0.0.1:")
    assert os.environ["AWS_ENDPOINT_URL"] == s3_server.endpoint
    _check(roundtrip(s3_server.uri(_prefix("driver"))))
    # the server really holds the bucket (seen through boto3, independently of pyarrow)
    names = [b["Name"] for b in s3_server.boto3_client().list_buckets()["Buckets"]]
    assert s3_server.bucket in names


def test_ray_task_with_runtime_env(ray_session, s3_server):
    # ray_session first: Ray may predate the S3 env; runtime_env still brings it to the worker.
    ray = ray_session
    task = ray.remote(num_cpus=0.5, max_retries=0)(roundtrip)
    result = ray.get(task.options(runtime_env=s3_server.runtime_env)
                     .remote(s3_server.uri(_prefix("rt-env"))), timeout=180)
    assert result["pid"] != os.getpid()
    _check(result)


def test_ray_task_and_ray_data_with_inherited_env(ray_with_s3, s3_server):
    ray = ray_with_s3
    task = ray.remote(num_cpus=0.5, max_retries=0)(roundtrip)
    result = ray.get(task.remote(s3_server.uri(_prefix("inherit"))), timeout=180)  # no runtime_env
    assert result["pid"] != os.getpid()
    _check(result)

    # Ray Data write + read tasks reach the server too (pipeline jobs pass no runtime_env)
    uri = s3_server.uri(_prefix("raydata"))
    ray.data.from_items([{"i": i, "s": f"row{i}"} for i in range(20)]).repartition(2) \
        .write_parquet(uri)
    fs, path = resolve_filesystem(uri)
    files = [i for i in fs.get_file_info(pafs.FileSelector(path)) if i.path.endswith(".parquet")]
    assert files and all(i.size > 0 for i in files)
    rows = ray.data.read_parquet(uri).take_all()
    assert sorted((r["i"], r["s"]) for r in rows) == [(i, f"row{i}") for i in range(20)]


def test_parquet_write_and_read(s3_server):
    uri = s3_server.uri(_prefix("pq") + "/t.parquet")
    table = pa.table({"video_id": ["a", "b", "c"], "label": [1.5, None, 63.0],
                      "frames": pa.array([[0, 6], [], [12]], pa.list_(pa.int32()))})
    fs, path = resolve_filesystem(uri)
    pq.write_table(table, path, filesystem=fs)
    assert pq.read_table(path, filesystem=fs).equals(table)
    assert pq.read_table(uri).equals(table)  # plain URI, pyarrow's own resolution, same env
    assert pq.read_metadata(path, filesystem=fs).num_rows == 3
