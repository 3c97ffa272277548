"""`stpm calibrate`: a new version with only the calibration changed. Its weights are the old ones byte for
byte and its maps the old maps bit for bit (torch and the exported ONNX scorer), on real images; only the
threshold, the normalised scores and the decisions move; the manifest says where the calibration came from."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from stpm import bundle
from stpm.bundle.manifest import Manifest
from stpm.cli import main as cli
from stpm.imaging.decode import read_image
from stpm.imaging.geometry import predict_maps, tile_images
from stpm.methods.loading import load_map
from stpm.methods.maps import tile_fn

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def store(tmp_path_factory, bottle_good):
    """A small PatchCore bundle (random ResNet18 teacher: mechanics only) with its ONNX scorer."""
    from stpm.options import ModelOptions, TrainingOptions, TrainOptions
    from stpm.training.pipeline import run_training

    models = tmp_path_factory.mktemp("models")
    cfg = TrainingOptions(model=ModelOptions(backbone="resnet18", pretrained=False, image_size=64, bank_size=500),
                          train=TrainOptions(device="cpu", val_fraction=0.4, seed=0))
    out = run_training(bottle_good[:14], "rc", models, cfg, show_bar=False)
    return models, out.path


def _maps(path, images):
    """(torch maps, ONNX raw maps, ONNX raw scores, ONNX normalised scores) of `images` under a bundle."""
    from stpm.runtime.scorer import Scorer

    amap, manifest = load_map(path)
    torch_maps = predict_maps(tile_fn(amap, torch.device("cpu")), tile_images(images, manifest.geometry))
    # pinned: "auto" picks the fastest backend / precision it measures, which may differ between two bundles
    scored = Scorer(path, intra_op_threads=1, backend="onnxruntime", precision="fp32").infer_images(images)
    return (torch_maps, [s.amap for s in scored], np.array([s.result.raw_score for s in scored]),
            np.array([s.result.score for s in scored]))


def _check_only_calibration_moved(models, old_path, new_path, images):
    old, new = Manifest.read(old_path), Manifest.read(new_path)
    assert new.files == old.files  # the weights' digests
    for f in old.files:
        assert (new_path / f).read_bytes() == (old_path / f).read_bytes()
    assert new.model == old.model and new.geometry == old.geometry and new.training["selection"] == \
        old.training["selection"]
    t_old, o_old, r_old, _ = _maps(old_path, images)
    t_new, o_new, r_new, s_new = _maps(new_path, images)
    for a, b in zip(t_old + o_old, t_new + o_new):
        assert np.array_equal(a, b)  # bit for bit
    assert np.array_equal(r_old, r_new)
    assert new.calibration.threshold != old.calibration.threshold
    assert np.allclose(s_new, new.calibration.normalise(r_new), atol=1e-5)  # normalised by the new calibration
    assert new.export_files and new.exports.parity["ok"]  # exported again, parity checked


def test_moving_the_target_republishes_only_the_calibration(store, bottle, capsys):
    models, v1 = store
    old = Manifest.read(v1).calibration
    assert old.method == "target_fpr" and len(old.good_scores) == old.n_images >= 5
    assert cli(["calibrate", "rc/v1", "--target-fpr", "0.2", "--models-dir", str(models)]) == 0
    assert '"rule": "target_fpr"' in capsys.readouterr().out
    v2 = bundle.resolve(models, "rc/v2")
    new = Manifest.read(v2).calibration
    assert new.target_fpr == 0.2 and new.threshold < old.threshold and new.good_scores == old.good_scores
    assert new.expected_fpr == pytest.approx(0.2, rel=1e-6)
    assert new.source["kind"] == "stpm calibrate" and new.source["from"] == "rc/v1"
    assert bundle.get_active(models, "rc") == "v1"  # not activated unless asked
    images = [read_image(p) for p in sorted((bottle / "test" / "broken_large").glob("*.png"))[:3]]
    _check_only_calibration_moved(models, v1, v2, images)


def test_new_good_images_recalibrate_and_record_their_source(store, bottle, bottle_good, tmp_path):
    models, v1 = store
    folder = tmp_path / "new-good"
    folder.mkdir()
    for p in bottle_good[100:110]:  # never seen in training (it used the first 14)
        shutil.copy(p, folder / p.name)
    assert cli(["calibrate", "rc/v1", str(folder), "--calibration", "max_margin", "--activate",
                "--models-dir", str(models)]) == 0
    ref = f"rc/{bundle.get_active(models, 'rc')}"
    path = bundle.resolve(models, ref)
    cal = Manifest.read(path).calibration
    assert cal.method == "max_margin" and cal.n_images == 10 and cal.source["images"] == str(folder)
    assert cal.synthetic["n_images"] == 10 and len(cal.synthetic_scores) == 10
    images = [read_image(p) for p in sorted((bottle / "test" / "good").glob("*.png"))[:3]]
    _check_only_calibration_moved(models, v1, path, images)


def test_calibrating_on_the_training_images_is_refused(store, bottle_good, tmp_path, capsys):
    models, _ = store
    folder = tmp_path / "same"
    folder.mkdir()
    for p in bottle_good[:14]:
        shutil.copy(p, folder / p.name)
    assert cli(["calibrate", "rc/v1", str(folder), "--models-dir", str(models)]) == 2
    assert "trained on" in capsys.readouterr().err
