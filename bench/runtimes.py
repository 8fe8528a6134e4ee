"""LiteMedSAM's encoder and decoder on eager torch, ONNX Runtime and OpenVINO (fp32), measured in one run.

Inputs are real: four slices of slicerio's chest CT (MedSAM's CT window 40/400, official slice preparation)
and tight boxes from its reference labels, in the model's 256 frame. Repeats are interleaved across backends
so a busy machine slows all of them alike; every figure is a median over the repeats.

Prints per backend: encoder seconds per slice at batch 1 and batch 4, decoder seconds per call with 1 and 8
boxes, and each ratio to eager torch; the FLOPs of one encoder slice and one decoder box as counted by
torch.utils.flop_counter (2 FLOP per multiply-add, matmul and convolution only); torch matmul GFLOP/s P
(2048x2048 fp32) measured in the same run, and the encoder efficiency eta = GFLOP per slice / s per slice / P.

    .venv/bin/python bench/runtimes.py [--repeats 5] [--threads N] [--cache-root DIR]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from machine import matmul_gflops  # bench/machine.py (scripts run from bench/)

BACKENDS = ("torch", "onnxruntime", "openvino")


def real_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    """Four prepared chest CT slices (4, 3, 256, 256) float32 and 8 boxes (8, 1, 4) in the 256 frame."""
    import slicerio

    from medsam_engine.detectors.coarse_mask import boxes_from_label_map
    from medsam_engine.pipeline.core.geometry import align_to
    from medsam_engine.pipeline.core.intensity import to_uint8
    from medsam_engine.pipeline.io.readers import read_volume
    from medsam_engine.pipeline.model.framing import FRAMINGS

    data = Path(slicerio.__file__).parent / "data"
    volume = read_volume(data / "CTChest4.nrrd")
    labels = align_to(read_volume(data / "Segmentation.seg.nrrd"), volume)
    u8 = to_uint8(volume.array, "CT")
    lite = FRAMINGS["lite"]
    prepared = np.stack([lite.prepare(u8[z])[0] for z in (14, 15, 16, 17)])
    images = torch.from_numpy(prepared).permute(0, 3, 1, 2)
    boxes = np.array([p.box for p in boxes_from_label_map(labels) if p.z == 15], dtype=np.float32)
    boxes = np.resize(boxes, (8, 4))  # repeats the slice's boxes up to 8
    return images.contiguous(), torch.from_numpy(lite.boxes(boxes, *volume.shape[1:]))[:, None, :]


def count_gflop(net: torch.nn.Module, image: torch.Tensor, box: torch.Tensor) -> tuple[float, float]:
    """GFLOP of one encoder slice and of one decoder box, counted on the model itself."""
    from torch.utils.flop_counter import FlopCounterMode

    from medsam_engine.pipeline.model.fast_decoder import BoxDecoder

    with torch.inference_mode():
        counter = FlopCounterMode(display=False)
        with counter:
            embedding = net.image_encoder(image)
        encoder = counter.get_total_flops() / 1e9
        counter = FlopCounterMode(display=False)
        with counter:
            BoxDecoder(net)(embedding, box)
    return encoder, counter.get_total_flops() / 1e9


def timed(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def measure(runners: dict, images: torch.Tensor, boxes: torch.Tensor, repeats: int) -> dict[str, dict]:
    """Median seconds per backend: encoder per slice at batch 1 and 4, decoder per call with 1 and 8 boxes."""
    samples: dict[str, dict[str, list[float]]] = {name: {} for name in runners}
    embedding = runners["torch"].model.net.image_encoder(images[:1])
    for repeat in range(repeats + 1):  # the first round warms up and is not kept
        for name, runner in runners.items():
            encode = (
                runner.model.net.image_encoder
                if runner._graphs is None
                else (lambda batch, graphs=runner._graphs: graphs.encode(batch.numpy()))
            )
            times = {
                "encoder_b1": timed(encode, images[:1]),
                "encoder_b4": timed(encode, images) / 4,
                "decoder_1box": timed(runner._decode_graph, embedding, boxes[:1]),
                "decoder_8box": timed(runner._decode_graph, embedding, boxes),
            }
            for key, seconds in times.items():
                if repeat:
                    samples[name].setdefault(key, []).append(seconds)
    return {
        name: {key: statistics.median(values) for key, values in keys.items()}
        for name, keys in samples.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch and runtime threads")
    parser.add_argument("--cache-root", default=None, help="graph cache root (default: $MEDSAM_ENGINE_CACHE)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.cache_root:
        os.environ["MEDSAM_ENGINE_CACHE"] = args.cache_root

    from medsam_engine.pipeline.model.checkpoint import load_lite_medsam
    from medsam_engine.pipeline.model.runner import LiteMedSAMRunner

    model = load_lite_medsam()
    runners = {"torch": LiteMedSAMRunner(model)}
    for name in BACKENDS[1:]:
        start = time.perf_counter()
        runners[name] = LiteMedSAMRunner(model, backend=name)
        print(f"{name}: graphs ready in {time.perf_counter() - start:.1f} s (exported once, then cached)")
    images, boxes = real_inputs()
    encoder_gflop, decoder_gflop = count_gflop(model.net, images[:1], boxes[:1])
    peaks = [matmul_gflops()]
    with torch.inference_mode():
        medians = measure(runners, images, boxes, args.repeats)
    peaks.append(matmul_gflops())
    peak = statistics.median(peaks)
    print(f"threads {torch.get_num_threads()}, repeats {args.repeats} (medians), torch {torch.__version__}")
    print(f"counted: encoder {encoder_gflop:.2f} GFLOP per slice, decoder {decoder_gflop:.2f} GFLOP per box")
    print(f"torch matmul 2048x2048 fp32: {peak:.1f} GFLOP/s (before/after: {peaks[0]:.1f}/{peaks[1]:.1f})")
    keys = ("encoder_b1", "encoder_b4", "decoder_1box", "decoder_8box")
    print(f"{'backend':<12}" + "".join(f"{k + ' s':>16}" for k in keys) + f"{'eta b1':>9}{'eta b4':>9}")
    for name, values in medians.items():
        etas = [encoder_gflop / values[k] / peak for k in keys[:2]]
        row = "".join(f"{values[k]:>16.4f}" for k in keys) + "".join(f"{e:>9.1%}" for e in etas)
        print(f"{name:<12}{row}")
    for name in BACKENDS[1:]:
        ratios = [medians["torch"][k] / medians[name][k] for k in keys]
        print(f"{name:<12}" + "".join(f"{r:>15.2f}x" for r in ratios) + "   (speed-up vs eager torch)")


if __name__ == "__main__":
    main()
