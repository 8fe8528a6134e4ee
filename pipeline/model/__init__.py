"""Layer 2: checkpoints, devices, model framing, the runner and its runtimes (torch, ONNX Runtime,
OpenVINO)."""
