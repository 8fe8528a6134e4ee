"""The model, loaded on first use: a run whose cases are all committed never loads it."""

from __future__ import annotations

import concurrent.futures
import functools
import threading

from medsam_engine.pipeline.annotate.config import EngineConfig
from medsam_engine.pipeline.annotate.shared_runner import SharedRunner
from medsam_engine.pipeline.core.provenance import file_sha256
from medsam_engine.pipeline.model.box_fill import BOX_FILL, BoxFillRunner
from medsam_engine.pipeline.model.build import build_runner
from medsam_engine.pipeline.model.checkpoint import LITE_MEDSAM_SHA256, load_lite_medsam
from medsam_engine.pipeline.model.devices import resolve_device
from medsam_engine.pipeline.model.runner import LiteMedSAMRunner


class LazyRunner:
    """Loads the model on first use, so a run whose cases are all committed never loads it.

    ``prefetch`` starts the load in a background thread, so the first case's read and prompts overlap it
    (loading is mostly native work: hashing, the runtime's compiled-graph import); ``get`` waits for it and
    raises whatever the load raised (a failed load is tried again by the next ``get``).
    """

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self._runner: LiteMedSAMRunner | None = None
        self._loading: concurrent.futures.Future | None = None
        self._lock = threading.Lock()
        self._shared: SharedRunner | None = None

    def _build(self) -> LiteMedSAMRunner:
        section = self.config.model
        if section.runner == BOX_FILL:
            return BoxFillRunner()  # type: ignore[return-value]  # the runner interface without a network
        device = resolve_device(section.device)
        cache_mb = section.embedding_cache_mb
        if cache_mb is None:
            cache_mb = 512 if self.config.prompts.detector == "learned" else 32
        return build_runner(
            load_lite_medsam(section.checkpoint, device=device, lazy=True),
            device=device,
            backend=section.backend,
            precision=section.precision,
            cache_bytes=cache_mb << 20,
        )

    def _start(self) -> concurrent.futures.Future:
        with self._lock:
            if self._loading is None:
                future: concurrent.futures.Future = concurrent.futures.Future()

                def load() -> None:
                    try:
                        future.set_result(self._build())
                    except BaseException as exc:
                        future.set_exception(exc)

                threading.Thread(target=load, name="medsam-engine-model-load", daemon=True).start()
                self._loading = future
            return self._loading

    def prefetch(self) -> None:
        """Start loading the model in the background unless it is loaded or loading."""
        if self._runner is None:
            self._start()

    def get(self) -> LiteMedSAMRunner:
        if self._runner is None:
            future = self._start()
            try:
                self._runner = future.result()
            except BaseException:
                with self._lock:
                    if self._loading is future and future.done():  # an interrupted wait keeps its load
                        self._loading = None
                raise
        return self._runner

    def shared(self, lock: threading.Lock, max_slices: int) -> SharedRunner:
        """The loaded runner shared by the threads that hold ``lock`` for its calls (one per lock), their
        encoder calls merged into batches of up to ``max_slices`` slices."""
        runner = self.get()
        with self._lock:
            if self._shared is None or self._shared.lock is not lock or self._shared.runner is not runner:
                self._shared = SharedRunner(runner, lock, max_slices)
            return self._shared

    def settle(self) -> None:
        """Wait for a background load still under way (a run whose cases all failed early leaves one),
        so no thread is left importing or compiling while the process exits; its outcome is kept for get()."""
        loading = self._loading
        if self._runner is None and loading is not None:
            concurrent.futures.wait([loading])

    def stats(self) -> dict:
        """The runner's counters, or {} when the model was never loaded."""
        return {} if self._runner is None else self._runner.stats.as_dict()

    @functools.cached_property
    def model_sha256(self) -> str:
        """The checkpoint's sha256, read once per runner (a user's checkpoint is hashed from disk)."""
        if self.config.model.runner == BOX_FILL:
            return BOX_FILL
        if self.config.model.checkpoint is None:
            return LITE_MEDSAM_SHA256
        return file_sha256(self.config.model.checkpoint)
