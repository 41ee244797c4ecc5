"""The training batches of a worker's epochs, prepared by a background thread ahead of the loop.

`EpochBatches(shard, epochs, lookahead, **iter_torch_batches_kwargs)`; `.epoch()` yields one
epoch's batches, `.wait_s` is the time the loop waited for them, `.close()` stops the thread.
Why it exists: docs/TRAINING.md, Throughput (the first batch of an epoch waited for a whole
shuffle buffer to fill).
"""
from __future__ import annotations

import queue
import threading
import time


class EpochBatches:
    """The training batches of consecutive epochs, produced by one background thread that runs ahead.

    Each epoch is one pass of `shard.iter_torch_batches(**kwargs)` (a new Ray Data execution: a
    fresh frame draw). Epoch e's pass ends when its local shuffle buffer is drained into a queue of
    `lookahead` batches, and the thread then starts epoch e+1's pass at once: the split's next
    execution and the refill of the shuffle buffer (which must hold `local_shuffle_buffer_size` rows
    before the first batch comes out) overlap the last batches of epoch e and the evaluation after
    it, instead of stalling the first step of epoch e+1. The passes run one after the other in the
    same thread, so one split iterator is never iterated twice at once. `wait_s` adds up the time
    the training loop waited for a batch.
    """

    _END = object()

    def __init__(self, shard, epochs: int, lookahead: int, **kwargs):
        self.wait_s = 0.0
        self._queue: "queue.Queue" = queue.Queue(maxsize=max(1, lookahead))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._produce, args=(shard, epochs, kwargs), daemon=True,
                                        name="hmhn-train-batches")
        self._thread.start()

    def _produce(self, shard, epochs: int, kwargs: dict) -> None:
        try:
            for _ in range(epochs):
                for batch in shard.iter_torch_batches(**kwargs):
                    if not self._put(batch):
                        return
                if not self._put(self._END):
                    return
        except BaseException as error:  # noqa: BLE001 - re-raised in the training loop
            self._put(error)

    def _put(self, item) -> bool:
        """Queue `item` (blocks while `lookahead` items wait); False once closed."""
        if self._stop.is_set():
            return False
        self._queue.put(item)  # close() empties the queue, which lets a blocked put through
        return not self._stop.is_set()

    def epoch(self):
        """This epoch's batches, in order; raises what the producer raised."""
        while True:
            started = time.perf_counter()
            item = self._queue.get()
            self.wait_s += time.perf_counter() - started
            if item is self._END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def close(self) -> None:
        """Stop the producer (after a break or at the end): it ends its pass at its next batch."""
        self._stop.set()
        try:
            while True:
                self._queue.get_nowait()
        except queue.Empty:
            pass
