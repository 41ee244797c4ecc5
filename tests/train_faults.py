"""Faults injected into training from tests; nothing in the library knows about them.

    with pytest.MonkeyPatch.context() as mp:
        inject(mp, Faults(kill_rank1_at_epoch=3, kill_marker=str(tmp / "killed")))
        run_training(config)

`inject` replaces what `hmhn.train.run_training` hands to its TorchTrainer (the name
`hmhn.train.train_loop_per_worker`, in this process) with `FaultyLoop(faults)`. Ray sends that
callable, the plan inside it, to every worker - also to the workers of a group restarted after a
failure - where it patches hmhn.train_loop, then runs the real loop: the move of
tests/crash_injection.py's setup hook for preprocessing, with the plan carried along. This module
is pickled by value, so workers need not import `tests`.

- kill_rank1_at_epoch=E, kill_marker=FILE: rank 1 exits hard (os._exit, as a crash or the OOM
  killer) at the start of epoch E, once: FILE records it, across restarts. It first waits until
  Ray Train has committed every report so far, so the group deterministically restarts from epoch
  E-1's checkpoint (a report still in flight would be lost with the process).
- nan_at_epoch=E: the training loss is NaN from epoch E on (a diverging run).
"""
from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Faults:
    kill_rank1_at_epoch: int = 0
    kill_marker: str = ""
    nan_at_epoch: int = 0


def inject(monkeypatch, faults: Faults) -> None:
    import ray.cloudpickle

    import hmhn.train

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    monkeypatch.setattr(hmhn.train, "train_loop_per_worker", FaultyLoop(faults))


class FaultyLoop:
    """The worker loop, with `faults` patched into hmhn.train_loop of the worker process first."""

    def __init__(self, faults: Faults):
        self.faults = faults

    def __call__(self, loop):
        import hmhn.train_loop as train_loop

        _patch(train_loop, self.faults)
        return train_loop.train_loop_per_worker(loop)


def _patch(train_loop, faults: Faults) -> None:
    real_epoch = getattr(train_loop.train_epoch, "real", train_loop.train_epoch)
    real_loss = getattr(train_loop.hmhn_loss, "real", train_loop.hmhn_loss)

    def nan_loss(output, labels, config):
        loss, parts = real_loss(output, labels, config)
        return loss * math.nan, parts

    def train_epoch(worker, training, batches, epoch):
        if faults.nan_at_epoch:
            train_loop.hmhn_loss = nan_loss if epoch >= faults.nan_at_epoch else real_loss
        if worker.rank == 1 and epoch == faults.kill_rank1_at_epoch and not os.path.exists(faults.kill_marker):
            import ray.train

            ray.train.get_all_reported_checkpoints(timeout_s=120)
            Path(faults.kill_marker).write_text(f"killed at epoch {epoch}\n")
            os._exit(1)
        return real_epoch(worker, training, batches, epoch)

    train_epoch.real, nan_loss.real = real_epoch, real_loss
    train_loop.train_epoch = train_epoch
