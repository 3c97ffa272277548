"""The method interface: a toy third method (tests/toy_method/, its own folder) registered at run time
trains, selects its smoothing on synthetic anomalies, calibrates, exports ONNX with the parity check,
publishes, reloads and scores through the same pipeline as the built-in methods, with nothing else
changed. And the registry's own rules."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from stpm.methods import registry

torch = pytest.importorskip("torch")


@pytest.fixture
def toy():
    from tests.toy_method.spec import SPEC, load

    registry.register(SPEC, load)
    yield SPEC
    registry.unregister(SPEC.name)


def _images(tmp_path, n=8, size=96, seed=0):
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        a = np.clip(rng.normal(120, 12, (size, size, 3)), 0, 255).astype(np.uint8)
        paths.append(tmp_path / f"good{i}.png")
        Image.fromarray(a).save(paths[-1])
    return paths


def test_a_toy_method_goes_through_the_whole_pipeline(toy, tmp_path):
    import stpm
    from stpm.bundle.manifest import Manifest
    from stpm.methods.loading import load_map
    from stpm.options import ModelOptions, TrainingOptions, TrainOptions, build
    from stpm.training.pipeline import run_training

    assert "toy_colour" in registry.names() and build({"method": "toy_colour"}).model.method == "toy_colour"
    cfg = TrainingOptions(model=ModelOptions(method="toy_colour", image_size=64, pretrained=False),
                          train=TrainOptions(device="cpu", val_fraction=0.25))
    out = run_training(_images(tmp_path), "toy", tmp_path / "models", cfg, show_bar=False)
    manifest = Manifest.read(out.path)
    assert manifest.method == "toy_colour" and manifest.files.keys() == {"toy_colour.safetensors"}
    assert manifest.exports.parity["ok"] and manifest.model.sigma in toy.sigma_candidates
    assert manifest.training["selection"]["candidates"]  # selection ran on its synthetic anomalies
    amap, _ = load_map(out.path)
    assert torch.equal(amap.mean, out.model.mean)
    good = np.full((96, 96, 3), 120, np.uint8)
    bad = good.copy()
    bad[30:50, 30:50] = (230, 20, 20)  # a red square on grey parts
    scorer = stpm.load(out.path, backend="onnxruntime", precision="fp32")
    r_good, r_bad = scorer.score([good, bad], map_size="model")
    assert r_bad.raw_score > r_good.raw_score  # measured: 212 x (a colour distance; AVX-512 and AVX2 alike)
    y, x = np.unravel_index(np.argmax(r_bad.anomaly_map), r_bad.anomaly_map.shape)
    s = 64 / 96  # the model's scale: 96 px good images -> one 64 px tile
    assert 30 * s - 2 <= y <= 50 * s + 2 and 30 * s - 2 <= x <= 50 * s + 2


def test_unknown_methods_are_refused_by_name_and_names_register_once(toy):
    from stpm.options import build

    with pytest.raises(ValueError, match="unknown method 'nearest'; choose one of stpm, patchcore, toy_colour"):
        registry.spec("nearest")
    with pytest.raises(ValueError, match="method='nearest'"):
        build({"method": "nearest"})
    with pytest.raises(ValueError, match="already registered"):
        registry.register(toy, lambda: None)
