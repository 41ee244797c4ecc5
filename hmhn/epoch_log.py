"""Per-epoch metrics in MLflow exactly once per epoch, across worker restarts and reruns of a run.

Ray Train commits an epoch when its controller has registered the epoch's report and checkpoint
(it writes its checkpoint list to the storage path); a restarted worker group and a rerun with the
same run name continue from the last committed epoch. An epoch whose metrics reached MLflow
before its commit is trained again after a crash in between (a worker dying within a moment of
its report, the driver killed) and would be logged twice. So rank 0 logs them after the commit:

* `CommittedEpochLog.after_report(metrics)`: a thread waits until Ray Train has committed every
  report so far (`ray.train.get_all_reported_checkpoints`; the controller polls the workers every
  ~2 s), then logs the epoch's metrics, step = epoch, while the next epoch trains. `wait()` joins
  it and raises what it raised (before the next epoch's and the final logging);
* `log_committed_epoch`: a worker group that starts from a checkpoint logs that epoch's metrics,
  stored in the checkpoint, if the run lacks them - the process may have died between the commit
  and the log.
"""
from __future__ import annotations

import threading
from typing import Any

# In the reported metrics, not MLflow metrics: the step is the epoch, start_epoch is bookkeeping.
_NOT_LOGGED = ("epoch", "start_epoch")
_PROBE = "train_loss"  # reported every epoch, always finite (a non-finite loss is never reported)


def _loggable(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in metrics.items() if k not in _NOT_LOGGED}


class CommittedEpochLog:
    """Rank 0's per-epoch MLflow logging, each epoch once Ray Train has committed it."""

    def __init__(self, logger):
        self._logger = logger  # hmhn.tracking.RunLogger
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def after_report(self, metrics: dict[str, Any]) -> None:
        """Call right after ray.train.report(metrics, checkpoint=...)."""
        self.wait()
        self._thread = threading.Thread(target=self._log_when_committed, args=(dict(metrics),), daemon=True,
                                        name="hmhn-epoch-log")
        self._thread.start()

    def _log_when_committed(self, metrics: dict[str, Any]) -> None:
        import ray.train

        try:
            ray.train.get_all_reported_checkpoints(consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED)
            self._logger.log_metrics(_loggable(metrics), step=int(metrics["epoch"]))
        except BaseException as error:  # noqa: BLE001 - raised in the training loop by wait()
            self._error = error

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error


def log_committed_epoch(logger, metrics: dict[str, Any]) -> bool:
    """Log a checkpoint's epoch metrics unless the run has them already; True if it logged them."""
    epoch = int(metrics["epoch"])
    if any(m.step == epoch for m in logger.client.get_metric_history(logger.run_id, _PROBE)):
        return False
    logger.log_metrics(_loggable(metrics), step=epoch)
    return True
