"""The training benchmark's plain loop (production pieces, no Ray) and the worker loop's batch
producer (hmhn.epoch_batches.EpochBatches) with a stand-in for a Ray Train dataset shard."""
from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest

from hmhn import HMHNConfig
from hmhn.data import write_synthetic_shardset
from hmhn.epoch_batches import EpochBatches
from hmhn.train import TrainConfig
from tests.job_modules import load_job

REPO = Path(__file__).resolve().parents[1]


def _bench():
    return load_job("bench_train")


def test_shuffle_buffer_hands_out_every_row_once():
    bench = _bench()
    buffer, rng, seen = bench.ShuffleBuffer(rows=10, extra=4, shape=(1,)), np.random.default_rng(0), []
    for start in range(0, 100, 4):
        buffer.add(np.zeros((4, 1), np.uint8), np.arange(start, start + 4, dtype=np.float32))
        while buffer.n >= 10 or (start == 96 and buffer.n >= 3):
            seen += buffer.take(3, rng)[1].tolist()
    assert len(seen) == 99 and len(set(seen)) == 99 and buffer.n == 1  # drop_last: one row left over


def test_plain_loop_trains_with_the_production_pieces(tmp_path):
    bench = _bench()
    data = write_synthetic_shardset(str(tmp_path / "synth000"), {"train": 3, "dev": 1}, frames_per_video=8, size=32)
    config = TrainConfig(data=data, epochs=2, batch_size=4, frames_per_video=4, model=HMHNConfig(input_size=32))
    rates = bench.plain_loop(config, threads=1)
    assert len(rates) == 2 and all(r > 0 for r in rates)


class FakeShard:
    """iter_torch_batches(**kwargs) -> `batches` items per pass; records passes and concurrency."""

    def __init__(self, batches: int, fail_in_pass: int = 0):
        self.batches, self.fail_in_pass = batches, fail_in_pass
        self.passes, self.active, self.max_active = 0, 0, 0
        self.lock = threading.Lock()

    def iter_torch_batches(self, **kwargs):
        with self.lock:
            self.passes += 1
            self.active += 1
            self.max_active = max(self.max_active, self.active)
            current = self.passes
        try:
            for i in range(self.batches):
                if current == self.fail_in_pass and i == 1:
                    raise RuntimeError("data task failed")
                yield {"pass": current, "i": i, **kwargs}
        finally:
            with self.lock:
                self.active -= 1


def test_epoch_batches_keep_epochs_apart_and_run_ahead():
    shard = FakeShard(batches=5)
    batches = EpochBatches(shard, epochs=3, lookahead=2, tag="x")
    got = [[(b["pass"], b["i"], b["tag"]) for b in batches.epoch()] for _ in range(3)]
    assert got == [[(p, i, "x") for i in range(5)] for p in (1, 2, 3)]
    assert shard.passes == 3 and shard.max_active == 1  # one pass at a time: never two iterations of a split
    batches.close()

    # While epoch 1 is being trained, the producer moves on to epoch 2 once epoch 1 is queued.
    shard = FakeShard(batches=2)
    batches = EpochBatches(shard, epochs=2, lookahead=4)
    first = batches.epoch()
    next(first)
    deadline = time.time() + 10
    while shard.passes < 2 and time.time() < deadline:
        time.sleep(0.01)
    assert shard.passes == 2
    batches.close()


def test_epoch_batches_raise_the_producers_error_and_stop_on_close():
    batches = EpochBatches(FakeShard(batches=3, fail_in_pass=2), epochs=3, lookahead=2)
    assert len(list(batches.epoch())) == 3
    with pytest.raises(RuntimeError, match="data task failed"):
        list(batches.epoch())

    shard = FakeShard(batches=1000)
    batches = EpochBatches(shard, epochs=1, lookahead=2)
    next(batches.epoch())
    batches.close()
    batches._thread.join(timeout=10)
    assert not batches._thread.is_alive() and shard.active == 0  # the pass was closed, not left hanging
