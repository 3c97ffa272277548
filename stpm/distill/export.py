"""ONNX export of a distilled classifier (dynamic batch) with an onnxruntime parity check."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn


def export_classifier_onnx(model: nn.Module, example_input: Tensor, path: Path, opset: int = 17) -> Path:
    """Export `model` (eval mode, on CPU) to ONNX with input "images" and output "logits"; batch axis dynamic."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    was_training = model.training
    model = model.eval().cpu()
    torch.onnx.export(model, (example_input.cpu(),), str(path), input_names=["images"], output_names=["logits"],
                      dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}}, opset_version=opset,
                      dynamo=False)
    model.train(was_training)
    return path


def onnx_logits(path: Path, images: np.ndarray) -> np.ndarray:
    """Run the exported classifier with onnxruntime on CPU. [B, C, H, W] float32 -> [B, K]."""
    from stpm.runtime.sessions import ort_session

    session = ort_session(path)
    return session.run(["logits"], {"images": images.astype(np.float32)})[0]


def check_parity(model: nn.Module, path: Path, images: Tensor, atol: float = 1e-4) -> float:
    """Max |torch - onnxruntime| logits difference; raises if above atol."""
    with torch.no_grad():
        ref = model.eval().cpu()(images.cpu()).numpy()
    diff = float(np.abs(ref - onnx_logits(path, images.cpu().numpy())).max())
    if diff > atol:
        raise AssertionError(f"ONNX and torch logits differ by {diff:.3g} > {atol}")
    return diff
