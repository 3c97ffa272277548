"""Training on real good images: the loss falls, runs are reproducible and resumable, the model finds
a pasted defect, and the calibration comes from held-out good images."""

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
    # measured last / first: 0.547 (this Xeon, AVX-512/AMX) and 0.570 (torch capped at AVX2)
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
    # a 6-epoch student; margins measured on both CPU kinds (this Xeon with AVX-512/AMX; torch capped at
    # AVX2): defective / good score 1.22-1.25 and 1.21-1.46; the map's maximum in the window / outside it
    # 1.18-1.28 and 1.22-1.36
    assert np.all(scores_d > scores_g), (scores_g, scores_d)
    for m in maps_d:
        py, px = np.unravel_index(np.argmax(m), m.shape)
        assert y - 4 <= py < y + s + 4 and x - 4 <= px < x + s + 4, (py, px)


def test_calibration_comes_from_the_held_out_images(trained, bottle_good):
    """The threshold is calibrated on the held-out good images only (the manifest names them, none of them
    trained on) and lies above their median. How few good images a threshold so calibrated flags is a
    claim about the rule on real scores: tests/test_calibrate.py checks it on a model no short training
    run decides (this 6-epoch student's scores depend on the CPU it trained on)."""
    _, path, _ = trained
    manifest = load_map(path)[1]
    cal, data = manifest.calibration.to_dict(), manifest.data
    assert cal["n_images"] == data["n_val"] == len(data["val_files"]) == len(cal["good_scores"])
    trained_on = {p.name for p in bottle_good[:24]} - set(data["val_files"])
    assert set(data["val_files"]) < {p.name for p in bottle_good[:24]} and len(trained_on) == data["n_train"]
    assert cal["threshold"] > cal["good_stats"]["median"] == np.median(cal["good_scores"])


def test_a_random_teacher_is_seeded_and_not_the_students_copy():
    """--no-pretrained (tests, speed benchmarks): the same seed builds the same teacher and student, and the
    teacher is not drawn from the student's seed (a same-backbone student would start as its copy)."""
    cfg = ModelOptions(method="stpm", backbone="resnet18", pretrained=False, image_size=64)
    a, _ = build_stpm(cfg, seed=0)
    torch.rand(7)  # whatever the global generator did in between
    b, _ = build_stpm(cfg, seed=0)
    for x, y in zip(a.state_dict().values(), b.state_dict().values()):
        assert torch.equal(x, y)
    t = dict(a.teacher.named_parameters())
    s = dict(a.student.named_parameters())
    shared = [k for k in t if k in s and t[k].shape == s[k].shape]
    assert shared and all(not torch.equal(t[k], s[k]) for k in shared if t[k].dim() > 1)
