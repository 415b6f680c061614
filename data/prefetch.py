"""The next optimizer steps' micro-batches, prepared in a background thread.

Packing rows, resharding them for context parallelism and pinning them in host memory happen
while the GPU runs the current step, so the training loop only issues non-blocking copies. The
data position saved in a checkpoint is the one after the last step *handed out*, never a
prefetched one, so a resume continues exactly where the trained steps end.
"""
from __future__ import annotations

import queue
import threading
from typing import Callable

import torch

from data.loader import PackedBatches


class StepPrefetcher:
    """Iterator over steps (lists of micro-batch dicts) of `batches`, `depth` steps ahead.

    `prepare(mb) -> mb` runs in the worker on each micro-batch (e.g. the CP shard); with `pin`
    every tensor is moved to pinned memory there. Each micro-batch gains `n_counted`, its number
    of label tokens (computed on the host: no device sync in the loop). Errors in the worker
    are raised by `next_step`.
    """

    def __init__(self, batches: PackedBatches, prepare: Callable[[dict], dict] | None = None,
                 *, depth: int = 2, pin: bool = False):
        if depth < 1:
            raise ValueError(f"prefetch depth={depth} must be >= 1")
        self.batches, self.prepare, self.pin = batches, prepare, pin
        self._state = batches.state_dict()
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._work, name="step-prefetch", daemon=True)
        self._thread.start()

    def _one(self, mb: dict) -> dict:
        if self.prepare is not None:
            mb = self.prepare(mb)
        mb = dict(mb, n_counted=int((mb["labels"] != -100).sum()))
        if self.pin:
            mb = {k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in mb.items()}
        return mb

    def _work(self) -> None:
        try:
            while not self._stop.is_set():
                step = [self._one(mb) for mb in self.batches.next_step()]
                item = (step, self.batches.state_dict())
                while not self._stop.is_set():
                    try:
                        self._queue.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
        except BaseException as err:  # handed to the consumer, which raises it
            self._queue.put((None, err))

    def next_step(self) -> list[dict]:
        step, state = self._queue.get()
        if step is None:
            raise state
        self._state = state
        return step

    def state_dict(self) -> dict:
        """Data position after the last step returned by next_step."""
        return dict(self._state)

    def close(self) -> None:
        self._stop.set()
        while self._thread.is_alive():
            try:  # unblock a worker waiting on a full queue
                self._queue.get_nowait()
            except queue.Empty:
                pass
            self._thread.join(timeout=0.05)
