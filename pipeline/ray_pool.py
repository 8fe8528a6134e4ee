"""Ray actor that holds LiteMedSAM and annotates shards of cases (paths in, outcome records out)."""
from __future__ import annotations

import os


class Annotator:
    """One model per actor, loaded on the first case that needs it; torch uses ``threads`` threads."""

    def __init__(self, config_json: str, store_root: str, threads: int = 1) -> None:
        os.environ.setdefault("OMP_NUM_THREADS", str(threads))
        import torch

        from pipeline.config import EngineConfig
        from pipeline.engine import LazyRunner
        from pipeline.store import CaseStore

        torch.set_num_threads(max(1, threads))
        self.config = EngineConfig.model_validate_json(config_json)
        self.store = CaseStore(store_root)
        self.runner = LazyRunner(self.config)

    def annotate(self, cases: list[dict]) -> list[dict]:
        from pipeline.engine import annotate
        from pipeline.types import CaseRef

        summary = annotate([CaseRef(**c) for c in cases], self.store, self.config, runner=self.runner,
                           show_progress=False)
        return [o.__dict__ for o in summary.outcomes]

    def stats(self) -> dict:
        return self.runner.stats()
