"""A runner for benchmarks only: it stands in for LiteMedSAM and returns every box filled, at once.

With it, a run measures everything but the model (discovery, hashing, the isolated reader, DICOM decoding,
prompts, post-processing, quality records, zarr writes, manifests, run records): the pipeline's own ceiling
on a node whose model would be infinitely fast (issue 19). Never used by the engine itself.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
from engine_tree import engine  # bench/ (scripts run from bench/)

LazyRunner = engine("annotate.lazy_runner").LazyRunner
RunnerStats = engine("model.runner").RunnerStats
SliceEmbedding = engine("model.runner").SliceEmbedding


class NullRunner:
    """The runner interface of :class:`pipeline.model.runner.LiteMedSAMRunner`, with no model behind it."""

    backend = "null"
    device = "cpu"
    bf16 = False

    def __init__(self) -> None:
        self.model = SimpleNamespace(name="null-runner", sha256="0" * 64, device="cpu")
        self.stats = RunnerStats()

    def memory_batch(self) -> int:
        return 1

    def encode(self, slices_u8: list[np.ndarray]) -> list[SliceEmbedding]:
        self.stats.encoder_calls += 1
        self.stats.encoded_slices += len(slices_u8)
        return [
            SliceEmbedding(np.empty(0, np.float32), tuple(s.shape[:2]), tuple(s.shape[:2])) for s in slices_u8
        ]

    def decode(self, embedded: SliceEmbedding, boxes_xyxy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        height, width = embedded.original_hw
        logits = np.full((len(boxes_xyxy), height, width), -8.0, dtype=np.float32)
        for k, (x0, y0, x1, y1) in enumerate(np.asarray(boxes_xyxy, dtype=float)):
            logits[k, int(y0) : int(np.ceil(y1)) + 1, int(x0) : int(np.ceil(x1)) + 1] = 8.0
        self.stats.decoder_calls += 1
        self.stats.decoded_boxes += len(boxes_xyxy)
        return logits, np.ones(len(boxes_xyxy), dtype=np.float32)


class NullLazyRunner(LazyRunner):
    """A LazyRunner whose model is the :class:`NullRunner` (signatures still name the configured model)."""

    def _build(self) -> NullRunner:  # type: ignore[override]
        return NullRunner()
