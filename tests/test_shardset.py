"""The shard-set format (pipeline.shardset) without Ray: strided row groups, the commit log and its
latest-wins rule, the index, reads that touch only the row groups they need, leftovers, the lock."""
from __future__ import annotations

import json
import os
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.schema import SHARD_SCHEMA
from pipeline.shardset import (LOCK_FILE, CommitLog, LockedError, RowGroupReader, RunLock, ShardFileWriter,
                               ShardIndex, delete_unreferenced_files, groups_for_draw, read_log, referenced_files,
                               strided_groups, write_index)


def _video_rows(video_id: str, n: int, image_bytes: int = 100) -> pa.Table:
    rows = [{"video_id": video_id, "subject_id": "s", "split": "train", "task": None, "label": 10.0,
             "frame_index": 3 * i, "timestamp_s": i / 10, "det_score": 0.9, "bbox": [0.0] * 4,
             "landmarks": [0.0] * 10, "image": bytes([i % 256]) * image_bytes, "preprocess_version": "v"}
            for i in range(n)]
    return pa.Table.from_pylist(rows[::-1], schema=SHARD_SCHEMA)  # any order in


def _commit(root: str, writer: ShardFileWriter, log: CommitLog, video_id: str, n: int, **extra) -> None:
    where = writer.add_video(_video_rows(video_id, n))
    writer.close()
    log.add({"video_id": video_id, "split": "train", "label": 10.0, "status": "ok", "faces_kept": n,
             "frames_decoded": n, "file": where.file, "row_group_first": where.row_group_first,
             "row_group_count": where.row_group_count, **extra})


@pytest.mark.parametrize("n,rows", [(1, 4), (4, 4), (5, 4), (40, 4), (41, 8)])
def test_strided_groups_partition_the_video_evenly(n, rows):
    groups = strided_groups(n, rows)
    assert sorted(np.concatenate(groups).tolist()) == list(range(n))
    assert all(len(g) <= rows for g in groups) and len(groups) == -(-n // rows)
    for g in groups:  # each group is evenly spaced across the whole video
        assert len(set(np.diff(g).tolist())) <= 1


def test_a_draw_reads_only_the_row_groups_it_needs(tmp_path):
    root = str(tmp_path)
    writer = ShardFileWriter(root, row_group_rows=4)
    log = CommitLog(root, "r1")
    _commit(root, writer, log, "long", 40)   # 10 groups of 4 frames
    _commit(root, writer, log, "short", 3)   # 1 group
    log.flush()
    write_index(root)
    index = ShardIndex.load(root)
    long, short = {v.video_id: v for v in index.videos()}["long"], {v.video_id: v for v in index.videos()}["short"]
    assert long.row_group_count == 10 and short.row_group_count == 1
    reader = RowGroupReader(root)
    everything = reader.read(long, None, ["frame_index", "image"])
    assert everything.column("frame_index").to_pylist() == [3 * i for i in range(40)]
    per_group = reader.bytes_read / 10
    reader.bytes_read = 0
    drawn = reader.draw(long, 4, 0.25, ["frame_index", "image"])
    assert reader.bytes_read == pytest.approx(per_group, rel=0.2)  # one group: 4 frames, not 40
    frames = drawn.column("frame_index").to_pylist()
    assert len(frames) == 4 and frames == sorted(frames) and len(set(np.diff(frames).tolist())) == 1
    assert len({tuple(reader.draw(long, 4, o, ["frame_index"]).column("frame_index").to_pylist())
                for o in np.linspace(0, 0.99, 10)}) > 1  # the offset moves the draw
    eight = reader.draw(long, 8, 0.5, ["frame_index"]).column("frame_index").to_pylist()
    assert len(eight) == 8 and len(set(eight)) == 8  # two groups spread over the video
    assert reader.draw(short, 5, 0.3, ["frame_index"]).num_rows == 5  # repeats for a short video
    assert groups_for_draw(40, 10, 40, 0.0) == list(range(10))


def test_the_newest_log_row_of_a_video_wins_and_only_referenced_files_survive(tmp_path):
    root = str(tmp_path)
    writer = ShardFileWriter(root, row_group_rows=8)
    first = CommitLog(root, "r1")
    first.add({"video_id": "a", "split": "train", "status": "failed", "reason": "decoder crash"})
    _commit(root, writer, first, "b", 5)
    first.flush()
    time.sleep(0.01)
    second = CommitLog(root, "r2", every_videos=1)  # one log object per video
    _commit(root, writer, second, "a", 6)
    assert second.objects_written == 1
    latest = {r["video_id"]: r for r in read_log(root).to_pylist()}
    assert latest["a"]["status"] == "ok" and latest["a"]["run_id"] == "r2" and latest["b"]["run_id"] == "r1"
    # A stray file (a killed run's) and a half-written one: never referenced, deleted by the next run.
    stray = writer.add_video(_video_rows("ghost", 4))
    writer.abort()
    (tmp_path / "shards" / "part-partial.parquet").write_bytes(b"PAR1 half a file")
    index = write_index(root)
    assert set(index.column("video_id").to_pylist()) == {"a", "b"}
    assert delete_unreferenced_files(root, referenced_files(index)) == 2
    assert not (tmp_path / stray.file).exists()
    assert {f"shards/{p.name}" for p in (tmp_path / "shards").iterdir()} == referenced_files(index)


def test_old_and_unfinished_shard_sets_get_a_clear_message(tmp_path):
    from pipeline.shardset import ShardSetError

    (tmp_path / "log").mkdir()
    with pytest.raises(ShardSetError, match="did not finish"):
        ShardIndex.load(str(tmp_path))
    old = tmp_path / "old"
    old.mkdir()
    (old / "config.json").write_text(json.dumps({"preprocess_version": "x", "config": {}}))
    with pytest.raises(ShardSetError, match="format 1"):
        ShardIndex.load(str(old))


def test_run_lock(tmp_path):
    root = str(tmp_path)
    with RunLock(root, settle_s=0):
        with pytest.raises(LockedError, match="another preprocessing run is writing"):
            RunLock(root, settle_s=0).acquire()
        forced = RunLock(root, force=True, settle_s=0).acquire()  # --force-unlock
        assert forced.took_over is not None
    # The first holder's release does not delete the lock the forced run now holds.
    assert json.loads((tmp_path / LOCK_FILE).read_text())["token"] == forced.token
    forced.release()
    assert not (tmp_path / LOCK_FILE).exists()
    # A stale lock (no heartbeat for stale_s) and a dead process on this host are taken over.
    (tmp_path / LOCK_FILE).write_text(json.dumps({"token": "x", "host": "elsewhere", "pid": 1,
                                                  "heartbeat": time.time() - 3600}))
    assert RunLock(root, stale_s=600, settle_s=0).acquire().took_over["host"] == "elsewhere"
    import socket
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / LOCK_FILE).write_text(json.dumps({"token": "y", "host": socket.gethostname(),
                                                  "pid": int(dead.stdout), "heartbeat": time.time()}))
    lock = RunLock(root, settle_s=0, heartbeat_s=0.05).acquire()
    assert lock.took_over["token"] == "y"
    first = json.loads((tmp_path / LOCK_FILE).read_text())["heartbeat"]
    time.sleep(0.3)  # the heartbeat thread keeps a live run's lock fresh while it waits for results
    assert json.loads((tmp_path / LOCK_FILE).read_text())["heartbeat"] > first
    lock.release()
    assert not (tmp_path / LOCK_FILE).exists()


def test_shard_files_are_plain_parquet_with_many_videos(tmp_path):
    root = str(tmp_path)
    writer = ShardFileWriter(root, row_group_rows=4)
    places = [writer.add_video(_video_rows(f"v{i}", 6)) for i in range(3)]
    writer.close()
    assert len({p.file for p in places}) == 1 and [p.row_group_first for p in places] == [0, 2, 4]
    table = pq.read_table(os.path.join(root, places[0].file))  # plain pyarrow
    assert table.num_rows == 18 and table.schema.equals(SHARD_SCHEMA)
