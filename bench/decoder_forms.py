"""SAM's box decoder as the official modules run it versus pipeline/model/fast_decoder.py's factored form,
measured in one run: eager torch and OpenVINO fp32, per box, at several boxes per call.

Input: a real embedding (slicerio's chest CT, middle slice, window 40/400) and real boxes from its reference
labels, repeated to the batch size. Printed per form: FLOPs per box (torch.utils.flop_counter, 2 per
multiply-add, at 16 boxes), ms per box for each batch size (median of interleaved repeats), eta = the
issue's 3.62 GFLOP per box / s / P and eta of the form's own FLOPs, P the torch matmul rate of this run; then
the factored/original speed ratio and the largest logit difference between the two forms.

    cd bench && ../.venv/bin/python decoder_forms.py [--repeats 3] [--batches 1 4 16 64]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from machine import matmul_gflops  # bench/machine.py (scripts run from bench/)

NOMINAL_GFLOP = 3.62


def real_inputs():
    import slicerio

    from medsam_engine.detectors.coarse_mask import boxes_from_label_map
    from medsam_engine.pipeline.core.geometry import align_to
    from medsam_engine.pipeline.core.intensity import to_uint8
    from medsam_engine.pipeline.io.readers import read_volume
    from medsam_engine.pipeline.model.checkpoint import load_lite_medsam
    from medsam_engine.pipeline.model.runner import LiteMedSAMRunner

    data = Path(slicerio.__file__).parent / "data"
    volume = read_volume(data / "CTChest4.nrrd")
    labels = align_to(read_volume(data / "Segmentation.seg.nrrd"), volume)
    z = volume.shape[0] // 2
    runner = LiteMedSAMRunner(load_lite_medsam())
    embedded = runner.encode([to_uint8(volume.array, "CT")[z]])[0]
    voxel_boxes = np.array([p.box for p in boxes_from_label_map(labels) if p.z == z], np.float32)
    boxes = runner.model.framing.boxes(voxel_boxes, *embedded.original_hw)
    return runner.model.net, embedded.tensor(), torch.from_numpy(boxes)[:, None, :]


def openvino_model(module: torch.nn.Module, embedding, boxes, folder: Path):
    import openvino as ov

    path = folder / f"{type(module).__name__}.onnx"
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            (embedding, boxes),
            str(path),
            dynamo=False,
            opset_version=17,
            input_names=["embedding", "boxes"],
            output_names=["low_res_logits", "iou"],
            dynamic_axes={"boxes": {0: "b"}, "low_res_logits": {0: "b"}, "iou": {0: "b"}},
        )
    config = {
        "INFERENCE_PRECISION_HINT": "f32",
        "INFERENCE_NUM_THREADS": torch.get_num_threads(),
        "PERFORMANCE_HINT": "LATENCY",
        "SNIPPETS_MODE": "DISABLE",
    }  # as pipeline/model/graph_cache.py compiles
    request = ov.Core().compile_model(str(path), "CPU", config).create_infer_request()
    return lambda e, b: request.infer({"embedding": e.numpy(), "boxes": b.numpy()})


def main() -> None:
    from torch.utils.flop_counter import FlopCounterMode

    from medsam_engine.pipeline.model.fast_decoder import BoxDecoder, FactoredBoxDecoder

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16, 64])
    args = parser.parse_args()
    net, embedding, real_boxes = real_inputs()
    forms = {"original": BoxDecoder(net).eval(), "factored": FactoredBoxDecoder(net).eval()}
    batch = {n: real_boxes[torch.arange(n) % len(real_boxes)] for n in args.batches}
    with torch.inference_mode():
        logits = {name: form(embedding, batch[max(args.batches)])[0] for name, form in forms.items()}
    gflop = {}
    for name, form in forms.items():
        with FlopCounterMode(display=False) as counter, torch.inference_mode():
            form(embedding, batch.get(16, real_boxes))
        gflop[name] = counter.get_total_flops() / 1e9 / (16 if 16 in batch else len(real_boxes))
    with tempfile.TemporaryDirectory() as tmp:
        runs = {(name, "torch"): torch.inference_mode()(form) for name, form in forms.items()}
        runs.update(
            {
                (name, "openvino"): openvino_model(form, embedding, real_boxes, Path(tmp))
                for name, form in forms.items()
            }
        )
        peak = matmul_gflops()
        times: dict = {key: {n: [] for n in args.batches} for key in runs}
        for _ in range(args.repeats + 1):  # the first round warms every graph and shape up, not counted
            for n in args.batches:
                for key, run in runs.items():
                    start = time.perf_counter()
                    run(embedding, batch[n])
                    times[key][n].append((time.perf_counter() - start) / n)
    difference = float((logits["factored"] - logits["original"]).abs().max())
    print(
        f"machine matmul {peak:.1f} GFLOP/s, torch {torch.__version__}, {torch.get_num_threads()} threads; "
        f"max |logit difference| factored vs original {difference:.1e}"
    )
    for (name, runtime), per_batch in times.items():
        cells = []
        for n, seconds in per_batch.items():
            s = statistics.median(seconds[1:])
            eta = f"{NOMINAL_GFLOP / s / peak:.2f} / {gflop[name] / s / peak:.2f}"
            cells.append(f"B={n}: {s * 1000:5.1f} ms (eta {eta})")
        print(f"{name:9s} {runtime:8s} {gflop[name]:.2f} GFLOP/box  " + "  ".join(cells))
    for runtime in ("torch", "openvino"):
        ratios = [
            statistics.median(times[("original", runtime)][n][1:])
            / statistics.median(times[("factored", runtime)][n][1:])
            for n in args.batches
        ]
        print(
            f"factored speed-up on {runtime}: "
            + ", ".join(f"B={n} {r:.2f}x" for n, r in zip(args.batches, ratios, strict=False))
        )


if __name__ == "__main__":
    main()
