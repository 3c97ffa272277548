"""The peer the default competes with: anomalib 2.7.0 `Patchcore()` with its defaults, built for benchmarks/peer.py.

    /work/venvs/anomalib/bin/python benchmarks/peer_patchcore.py --train <bottle>/train/good \
        --cache benchmarks/work/peer_patchcore [--refit]

Runs in the peer's virtualenv (anomalib, torch, openvino; nothing of this project). The model is
`Patchcore()`: wide_resnet50_2, layer2 + layer3, coreset_sampling_ratio 0.1, its default pre-processor
(resize to 256 px, ImageNet normalisation), with timm's `pretrained=False` patched in (offline; speed does not
depend on the weights). Fit is anomalib's feature pass over the training images: what its `training_step`
does, `model.model(pre_processor.transform(images))` in training mode, in batches of 32 (its datamodules'
default), timed from reading the images to the last embedding. anomalib's greedy coreset would then pick
`int(n_patches * 0.1)` rows; it takes over half an hour on a 2-core CPU and its memory grows per step, so
the bank is filled with that many rows picked at random instead: the search costs the same at inference.
Exports, both with batch 1: `to_openvino(input_size=(512, 512))` with no dynamic axes (its default makes the
batch axis dynamic, which the exporter fixes at 2) and `to_torch`. They and build.json are cached in --cache;
a rerun reuses them unless --refit.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path
from typing import Callable

PC_KINDS = ("peer_pc_ov", "peer_pc_ov_f32", "peer_pc_torch")
INPUT_SIZE = (512, 512)  # the bottle PNGs; the graph resizes to the model's 256 px itself
TRAIN_BATCH = 32  # anomalib's datamodules' default train_batch_size
SEED = 0


def offline_timm() -> None:
    """timm.create_model with pretrained=False: no download here, and speed does not depend on the weights."""
    import timm

    if getattr(timm.create_model, "_offline", False):
        return
    create = timm.create_model

    def no_download(*args, **kw):
        kw["pretrained"] = False
        return create(*args, **kw)

    no_download._offline = True
    timm.create_model = no_download


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").is_file() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _paths(cache: Path) -> dict[str, Path]:
    return {"xml": cache / "weights" / "openvino" / "model.xml", "pt": cache / "weights" / "torch" / "model.pt",
            "record": cache / "build.json"}


def feature_pass(module, images: list[Path]) -> dict:
    """anomalib's training pass (embeddings into model.embedding_store), timed; returns what it measured."""
    import torch
    from anomalib.data.utils import read_image

    module.train()
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(images), TRAIN_BATCH):
            batch = torch.stack([read_image(p, as_tensor=True) for p in images[i:i + TRAIN_BATCH]])
            module.model(module.pre_processor.transform(batch))
    seconds = time.perf_counter() - t0
    store = module.model.embedding_store
    n_patches, dims = sum(e.shape[0] for e in store), store[0].shape[1]
    per_image = n_patches // len(images)
    side = int(round(per_image ** 0.5))
    return {"fit_seconds": round(seconds, 2), "images": len(images), "patches": n_patches,
            "patches_per_image": per_image,
            "feature_grid": [side, side] if side * side == per_image else None, "dims": dims,
            "torch_threads": torch.get_num_threads(), "load_average_start": round(load0, 2),
            "load_average_end": round(os.getloadavg()[0], 2)}


def random_bank(module, ratio: float) -> int:
    """The memory bank: int(n * ratio) rows (the size anomalib's KCenterGreedy coreset gives) picked at random."""
    import torch

    embeddings = torch.vstack(module.model.embedding_store)
    module.model.embedding_store.clear()
    size = int(embeddings.shape[0] * ratio)
    rows = torch.randperm(embeddings.shape[0], generator=torch.Generator().manual_seed(SEED))[:size]
    module.model.memory_bank = embeddings[rows].contiguous()
    return size


def build(train_dir: Path, cache: Path) -> dict:
    """Fit (feature pass + random bank), export OpenVINO and torch with batch 1, write build.json."""
    offline_timm()
    import openvino as ov
    import torch
    from anomalib.models import Patchcore

    images = sorted(p for p in train_dir.iterdir() if p.suffix.lower() in {".png", ".jpg", ".jpeg", ".bmp"})
    if not images:
        raise SystemExit(f"no training images in {train_dir}")
    torch.manual_seed(SEED)
    module = Patchcore()
    record = {"model": "anomalib.models.Patchcore() defaults", "backbone": module.model.backbone,
              "layers": list(module.model.layers), "coreset_sampling_ratio": module.coreset_sampling_ratio,
              "image_size": list(module.pre_processor.transform.transforms[0].size), "train_dir": str(train_dir),
              "cpu": _cpu_model(), "torch": torch.__version__}
    record |= feature_pass(module, images)
    record["bank_rows"] = random_bank(module, module.coreset_sampling_ratio)
    record["bank"] = f"random rows (seed {SEED}), as many as the coreset keeps: int(patches x coreset_sampling_ratio)"
    module.eval()
    t0 = time.perf_counter()
    xml = module.to_openvino(export_root=cache, input_size=INPUT_SIZE, onnx_kwargs={"dynamic_axes": {}})
    pt = module.to_torch(export_root=cache)
    record["export_seconds"] = round(time.perf_counter() - t0, 2)
    shape = ov.Core().read_model(xml).input(0).get_partial_shape()
    record["openvino_input_shape"] = str(shape)
    if shape[0].is_dynamic or shape[0].get_length() != 1:
        raise SystemExit(f"the OpenVINO export's batch axis is {shape[0]}, not 1")
    record["exports"] = {"openvino": str(xml.relative_to(cache)), "torch": str(pt.relative_to(cache))}
    _paths(cache)["record"].write_text(json.dumps(record, indent=1) + "\n")
    return record


def ensure_built(train_dir: Path, cache: Path, refit: bool = False) -> dict:
    """The cached build, or a new one when missing (or --refit)."""
    p = _paths(cache)
    if not refit and all(p[k].is_file() for k in ("xml", "pt", "record")):
        return json.loads(p["record"].read_text())
    cache.mkdir(parents=True, exist_ok=True)
    return build(train_dir, cache)


def predictor(kind: str, cache: Path) -> tuple[Callable[[Path], float], dict]:
    """The peer's own inferencer on the cached export: OpenVINOInferencer (its default precision) or TorchInferencer."""
    offline_timm()  # unpickling the torch export rebuilds the timm backbone
    p = _paths(cache)
    if kind in ("peer_pc_ov", "peer_pc_ov_f32"):  # its default precision (bf16 where the CPU has it), or f32
        from anomalib.deploy import OpenVINOInferencer

        config = {"INFERENCE_PRECISION_HINT": "f32"} if kind == "peer_pc_ov_f32" else None
        inf = OpenVINOInferencer(path=p["xml"], device="CPU", config=config)
        info = {"inference_precision": str(inf.model.get_property("INFERENCE_PRECISION_HINT")),
                "threads": int(inf.model.get_property("INFERENCE_NUM_THREADS")), "_openvino": [inf.model]}
    elif kind == "peer_pc_torch":
        import torch
        from anomalib.deploy import TorchInferencer

        os.environ.setdefault("TRUST_REMOTE_CODE", "1")  # our own pickle, written by build()
        inf = TorchInferencer(path=p["pt"], device="cpu")
        info = {"runtime": "torch", "dtype": str(inf.model.model.memory_bank.dtype).removeprefix("torch."),
                "threads": torch.get_num_threads()}
    else:
        raise ValueError(f"unknown Patchcore peer kind {kind!r} (one of {PC_KINDS})")
    info["bank_rows"] = json.loads(p["record"].read_text())["bank_rows"]
    return (lambda path: float(inf.predict(str(path)).pred_score.ravel()[0])), info


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--train", required=True, help="folder of the good training images (bottle/train/good)")
    ap.add_argument("--cache", required=True, help="where the exports and build.json are kept")
    ap.add_argument("--refit", action="store_true", help="fit and export again even if cached")
    a = ap.parse_args()
    print(json.dumps(ensure_built(Path(a.train), Path(a.cache), a.refit), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
