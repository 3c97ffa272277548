"""Training on real good images: the loss falls, runs are reproducible and resumable, the model finds
a pasted defect, and calibration on good images only flags few good images."""

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from stpm.options import ModelOptions, TrainOptions
from stpm.methods.stpm.dataset import ImageArrayDataset, to_tensor
from stpm.training.data import load_images
from stpm.methods.stpm.model import build_stpm
from stpm.methods.stpm.trainer import fit, predict, train_one_epoch
from stpm.training.reproducible import split_indices
from stpm.methods.loading import load_map


def loaders(images, batch=4):
    return (DataLoader(ImageArrayDataset(images[:8]), batch_size=batch, shuffle=False),
            DataLoader(ImageArrayDataset(images[8:]), batch_size=batch))


@pytest.fixture(scope="module")
def small_images(bottle_good):
    return load_images(bottle_good[:10], 64)[0]


def test_loss_falls_on_real_images(small_images):
    model, _ = build_stpm(ModelOptions(method="stpm", backbone="resnet18", pretrained=False, image_size=64), seed=0)
    opt = torch.optim.SGD(model.student.parameters(), lr=0.4, momentum=0.9, weight_decay=1e-4)
    train, _ = loaders(small_images)
    losses = [train_one_epoch(model, train, opt, torch.device("cpu")) for _ in range(4)]
    assert losses[-1] < 0.7 * losses[0], losses


def test_training_is_deterministic_on_cpu(small_images):
    def run():
        torch.manual_seed(0)
        model, _ = build_stpm(ModelOptions(method="stpm", backbone="resnet18", pretrained=False, image_size=64), seed=0)
        train, val = loaders(small_images)
        r = fit(model, train, val, TrainOptions(epochs=2, lr=0.4, device="cpu"), torch.device("cpu"),
                show_bar=False)
        return r.history, model.student_state_dict()

    (h1, s1), (h2, s2) = run(), run()
    assert [e["loss"] for e in h1] == [e["loss"] for e in h2]
    assert all(torch.equal(s1[k], s2[k]) for k in s1)


def test_resume_continues_from_the_checkpoint(small_images, tmp_path):
    ckpt = tmp_path / "checkpoint.pt"
    cfg = TrainOptions(epochs=3, lr=0.4, device="cpu")

    def fresh():
        model, _ = build_stpm(ModelOptions(method="stpm", backbone="resnet18", pretrained=False, image_size=64), seed=0)
        return model

    train, val = loaders(small_images)
    first = fit(fresh(), train, val, TrainOptions(epochs=2, lr=0.4, device="cpu"), torch.device("cpu"), ckpt,
                show_bar=False)
    assert first.epochs_run == 2 and ckpt.is_file()
    resumed = fit(fresh(), train, val, cfg, torch.device("cpu"), ckpt, resume=True, show_bar=False)
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3]
    assert resumed.history[:2] == first.history


def test_stop_request_raises_and_keeps_checkpoint(small_images, tmp_path):
    from stpm.methods.base import TrainingStopped

    model, _ = build_stpm(ModelOptions(method="stpm", backbone="resnet18", pretrained=False, image_size=64), seed=0)
    train, val = loaders(small_images)
    calls = []

    def should_stop():
        calls.append(1)
        return len(calls) > 3  # stop during the second epoch

    with pytest.raises(TrainingStopped):
        fit(model, train, val, TrainOptions(epochs=5, device="cpu"), torch.device("cpu"), tmp_path / "c.pt",
            should_stop=should_stop, show_bar=False)
    assert (tmp_path / "c.pt").is_file()


def test_split_is_deterministic_and_disjoint():
    a = split_indices(50, 0.2, 0)
    assert a == split_indices(50, 0.2, 0) and len(a[1]) == 10 and not set(a[0]) & set(a[1])
    with pytest.raises(ValueError):
        split_indices(1, 0.2, 0)


def paste_defect(img: np.ndarray, y: int, x: int, size: int) -> np.ndarray:
    """A dark scratch-like patch with a bright rim: a foreign texture on a good part."""
    out = img.copy()
    rng = np.random.default_rng(0)
    patch = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
    patch[:, : size // 4] = 230
    out[y : y + size, x : x + size] = patch
    return out


def test_pasted_defect_raises_the_score_and_the_map_peaks_there(trained, bottle):
    _, path, _ = trained
    amap, manifest = load_map(path)
    model, size = amap.model, manifest.model.image_size
    good = load_images(sorted((bottle / "test" / "good").glob("*.png"))[:4], size)[0]
    y, x, s = 30, 50, 16
    defective = np.stack([paste_defect(g, y, x, s) for g in good])
    maps_g, scores_g = predict(model, to_tensor(good), torch.device("cpu"))
    maps_d, scores_d = predict(model, to_tensor(defective), torch.device("cpu"))
    assert np.all(scores_d > scores_g), (scores_g, scores_d)
    for m in maps_d:
        py, px = np.unravel_index(np.argmax(m), m.shape)
        assert y - 4 <= py < y + s + 4 and x - 4 <= px < x + s + 4, (py, px)


def test_calibration_on_good_only_flags_few_good_images(trained, bottle, bottle_good):
    """Calibrate on 40 held-out good images (as a real run's 20 % split of ~200), then score the
    separately captured test/good images: few of them may cross the threshold."""
    from stpm.training.calibration import calibrate

    _, path, _ = trained
    amap, manifest = load_map(path)
    model, cal, size = amap.model, manifest.calibration.to_dict(), manifest.model.image_size
    assert cal["n_images"] == manifest.data["n_val"] and cal["threshold"] > cal["good_stats"]["median"]
    held_out = load_images(bottle_good[100:140], size)[0]  # never seen in training (it used [:24])
    _, held_scores = predict(model, to_tensor(held_out), torch.device("cpu"))
    c = calibrate(held_scores)
    good = load_images(sorted((bottle / "test" / "good").glob("*.png")), size)[0]
    _, scores = predict(model, to_tensor(good), torch.device("cpu"))
    assert np.mean(scores >= c.threshold) <= 0.15, (c.threshold, scores)
