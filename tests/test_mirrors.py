"""PatchCore's mirror averaging (ModelOptions.mirrors, stpm.methods.patchcore.mirrors): the averaged map is
exactly mirror-equivariant where the plain map is not; the bank holds the mirrored tiles' features (padding
mirrored with them, each patch keeping its image's fold); a bundle trained with mirrors exports one ONNX graph
that agrees with torch (the export's parity check) and reloads with its mirrors."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip("torch")

from stpm.imaging.geometry import Geometry, tile_images, valid_grid  # noqa: E402
from stpm.methods import registry  # noqa: E402
from stpm.methods.patchcore.mirrors import (  # noqa: E402
    MIRRORS,
    mean_of_views,
    mirror_boxes,
    mirror_dims,
    mirror_tiles,
    views,
)
from stpm.options import ModelOptions, TrainingOptions, TrainOptions  # noqa: E402

SIZE = 64
EXACT = "donot_use_mm_for_euclid_dist"  # cdist's matmul shortcut loses ~1e-3 of the norm: not "equal rows"


def _cfg(mirrors: str = "none"):
    return registry.spec("patchcore").resolve(
        ModelOptions(backbone="resnet18", pretrained=False, image_size=SIZE, mirrors=mirrors))


def _map(mirrors: str):
    from stpm.methods.patchcore.anomaly_map import PatchCoreMap
    from stpm.methods.patchcore.features import build_features

    with torch.random.fork_rng():  # the same random teacher in every call, without moving the global seed
        torch.manual_seed(0)
        features, _ = build_features(_cfg())
    bank = torch.randn(300, 128 + 256, generator=torch.Generator().manual_seed(1))
    return PatchCoreMap(features, bank, sigma=0.0, mirrors=mirrors).eval()


def test_the_mirror_averaged_map_is_mirror_equivariant_and_the_plain_map_is_not():
    x = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        plain, both, lr = _map("none"), _map("hv"), _map("h")
        m = both.unblurred(x)
        for d in MIRRORS["hv"]:
            torch.testing.assert_close(both.unblurred(x.flip(d)), m.flip(d), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(lr.unblurred(x.flip(-1)), lr.unblurred(x).flip(-1), rtol=1e-4, atol=1e-4)
        # the strided teacher is not mirror-symmetric: without the average a mirrored tile's map differs
        p = plain.unblurred(x)
        assert float((plain.unblurred(x.flip(-1)) - p.flip(-1)).abs().max()) > 100 * 1e-4 * float(p.abs().mean())
        # the views' mean is the mean of the plain maps of the tile and of its mirrors, mirrored back
        want = (p + sum(plain.unblurred(x.flip(d)).flip(d) for d in MIRRORS["hv"])) / 4
        torch.testing.assert_close(m, want, rtol=1e-4, atol=1e-4)


def test_views_and_their_mean_undo_each_other():
    x = torch.arange(2 * 1 * 3 * 4, dtype=torch.float32).reshape(2, 1, 3, 4)
    for name, dims in MIRRORS.items():
        v = views(x, dims)
        assert v.shape == (2 * (1 + len(dims)), 1, 3, 4)
        torch.testing.assert_close(mean_of_views(v[:, 0], dims), x[:, 0])  # each view mirrored back is x
    with pytest.raises(ValueError, match="mirrors='x': choose one of none, h, v, hv"):
        mirror_dims("x")


def test_mirrored_boxes_cover_the_mirrored_tiles_own_pixels():
    rng = np.random.default_rng(0)
    tiles = rng.integers(0, 256, (3, SIZE, SIZE, 3), dtype=np.uint8)
    boxes = np.array([[0, SIZE, 0, SIZE], [5, 40, 0, 23], [10, SIZE, 30, 61]])
    for d in MIRRORS["hv"]:
        own = np.zeros(tiles.shape[:3], bool)
        for t, (y0, y1, x0, x1) in enumerate(boxes):
            own[t, y0:y1, x0:x1] = True
        t = torch.from_numpy(own[:, None])
        want = t.flip(d)[:, 0].numpy()
        got = np.zeros_like(own)
        for i, (y0, y1, x0, x1) in enumerate(mirror_boxes(boxes, SIZE, d)):
            got[i, y0:y1, x0:x1] = True
        assert np.array_equal(got, want)
        tt = torch.from_numpy(np.ascontiguousarray(tiles)).permute(0, 3, 1, 2)
        assert np.array_equal(mirror_tiles(tiles, d), tt.flip(d).permute(0, 2, 3, 1).numpy())


def test_the_mirrored_bank_holds_every_mirrors_features_and_their_images_folds():
    from stpm.methods.base import FitData, FitRun
    from stpm.methods.patchcore.features import collect_features
    from stpm.methods.patchcore.method import PatchCore, _patch_folds

    rng = np.random.default_rng(3)
    sizes = [(30, 90), (64, 64), (100, 40)]  # padded tiles and an image of several tiles
    tiled = tile_images([rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in sizes],
                        Geometry(SIZE, 1.0, small_images="pad"))
    assert tiled.padded
    folds = [2, 0, 1]
    data = FitData(tiled, tiled, 0, torch.Generator().manual_seed(0), folds)
    run = FitRun(torch.device("cpu"), show_bar=False)
    fitted = PatchCore().fit(_cfg("hv"), TrainOptions(batch_size=4), data, run)
    assert fitted.amap.mirrors == "hv" and fitted.record["patchcore"]["mirrors"] == "hv"
    grid = (SIZE // 8, SIZE // 8)
    expected, boxes = 0, tiled.boxes()
    for d in ((),) + MIRRORS["hv"]:
        b = mirror_boxes(boxes, SIZE, d)
        feats = collect_features(fitted.amap.features, mirror_tiles(tiled.tiles, d), torch.device("cpu"), 4, None, b)
        expected += len(feats.features)
        assert len(feats.features) == valid_grid(b, SIZE, grid).sum()
        # the bank keeps every patch at this size: each mirrored feature is one of its rows
        scale = float(feats.features.norm(dim=1).mean())
        assert float(torch.cdist(feats.features, fitted.amap.bank, compute_mode=EXACT).amin(1).max()) < 1e-3 * scale
    info = fitted.record["patchcore"]
    assert info["n_patches"] == len(fitted.amap.bank) == expected
    from stpm.methods.patchcore.method import _features

    patches = _features(fitted.amap.features, data, run, 4, "hv")
    got = _patch_folds(data, patches).numpy()
    tile_image = np.repeat(np.arange(len(sizes)), np.diff(tiled.offsets))
    assert np.array_equal(got, np.asarray(folds)[tile_image[patches.tile]])
    for image, fold in enumerate(folds):  # every image's patches, mirrored ones included, carry its fold
        assert (got == fold).sum() > 0


@pytest.mark.slow
def test_a_bundle_with_mirrors_exports_one_graph_that_agrees_with_torch(tmp_path):
    import stpm
    from stpm.bundle.manifest import Manifest
    from stpm.methods.loading import load_map
    from stpm.training.pipeline import run_training

    rng = np.random.default_rng(4)
    paths = []
    for i in range(8):
        paths.append(tmp_path / f"good{i}.png")
        Image.fromarray(np.clip(rng.normal(120, 15, (80, 96, 3)), 0, 255).astype(np.uint8)).save(paths[-1])
    cfg = TrainingOptions(model=ModelOptions(backbone="resnet18", pretrained=False, image_size=SIZE, mirrors="hv"),
                          train=TrainOptions(device="cpu", val_fraction=0.25, batch_size=4))
    out = run_training(paths, "mirrored", tmp_path / "models", cfg, show_bar=False)
    manifest = Manifest.read(out.path)
    assert manifest.model.mirrors == "hv" and manifest.exports.parity["ok"]
    amap, _ = load_map(out.path)
    assert amap.mirrors == "hv"
    img = np.asarray(Image.open(paths[0]).convert("RGB"))
    scorer = stpm.load(out.path, backend="onnxruntime", precision="fp32")
    a, b = scorer.score([img, img[:, ::-1].copy()], map_size="model")
    # one image and its mirror: the same score, the mirrored map (the graph averages over the mirrors)
    assert abs(a.raw_score - b.raw_score) <= 1e-3 * abs(a.raw_score)
