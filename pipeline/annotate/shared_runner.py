"""One model shared by the threads of concurrent cases, its encoder calls merged into batches.

In the local job and in a Ray actor several cases are in flight at once (pipeline/annotate/job.py,
pipeline/distributed/ray_pool.py). On the CPU each case takes the model lock for its whole segmentation. On a
GPU, whose encoder runs a batch of slices in about the time of one, the cases share the model instead:
:class:`SharedRunner` merges the encoder calls that concurrent cases make while the model is busy into one
batch of up to ``max_slices`` slices (the slices of many small 2D cases in one GPU call), and lets decoder
calls take turns. Every call into the underlying runner holds the same model lock, so a detector that runs
the model under that lock (the learned one) never overlaps them.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import numpy as np

from medsam_engine.pipeline.model.runner import LiteMedSAMRunner, SliceEmbedding


@dataclass
class _Request:
    slices: list[np.ndarray]
    done: threading.Event = field(default_factory=threading.Event)
    result: list[SliceEmbedding] | None = None
    error: BaseException | None = None


class SharedRunner:
    """The runner interface (``encode``, ``decode`` and the runner's attributes) over a runner that several
    threads use at once; encoder calls queued while the model is busy go through it together.

    A thread that finds the model free takes every queued request, oldest first, up to ``max_slices`` slices
    (always at least one request), runs them in one encoder call and hands each caller its embeddings; a
    caller whose request was taken by another thread just waits for it. Results equal separate calls' (the
    runner's embedding cache still serves repeated slices); an encoder error reaches every caller of its
    batch.
    """

    def __init__(self, runner: LiteMedSAMRunner, lock: threading.Lock, max_slices: int) -> None:
        if max_slices < 1:
            raise ValueError(f"Argument 'max_slices' must be >= 1; got {max_slices}.")
        self.runner = runner
        self.lock = lock
        self.max_slices = max_slices
        self._queue: list[_Request] = []
        self._queue_lock = threading.Lock()

    def __getattr__(self, name: str):
        return getattr(self.runner, name)

    def encode(self, slices_u8: list[np.ndarray]) -> list[SliceEmbedding]:
        request = _Request(list(slices_u8))
        with self._queue_lock:
            self._queue.append(request)
        while not request.done.is_set():
            with self.lock:
                if not request.done.is_set():
                    self._run(self._take())
        if request.error is not None:
            raise request.error
        return request.result  # type: ignore[return-value]

    def _take(self) -> list[_Request]:
        with self._queue_lock:
            batch, size = [], 0
            while self._queue and (not batch or size + len(self._queue[0].slices) <= self.max_slices):
                batch.append(self._queue.pop(0))
                size += len(batch[-1].slices)
            return batch

    def _run(self, batch: list[_Request]) -> None:
        try:
            embedded = self.runner.encode([s for request in batch for s in request.slices])
        except BaseException as exc:
            for request in batch:
                request.error = exc
                request.done.set()
            return
        start = 0
        for request in batch:
            request.result = embedded[start : start + len(request.slices)]
            start += len(request.slices)
            request.done.set()

    def decode(self, embedded: SliceEmbedding, boxes_xyxy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with self.lock:
            return self.runner.decode(embedded, boxes_xyxy)
