"""stpm.tiling without a model: plan invariants, tiles, stitching, image scores, errors, no torch."""

from __future__ import annotations


import numpy as np
import pytest

from stpm.imaging.scores import image_score, image_scores

from stpm.imaging.geometry import axis_origins, plan, predict_maps, stitch, tile_images, tiles
from stpm.options import TilingOptions
from stpm.imaging.decode import resize_rgb
from stpm.imaging.geometry import DEFAULT_SCALE_QUANTILE, Geometry, TilingError
from stpm.imaging.scores import ImageScore
from stpm.training.data import choose_geometry, choose_scale

SIZES = [(64, 64), (64, 65), (65, 64), (96, 300), (300, 96), (250, 630), (630, 250), (513, 1000), (1000, 1000),
         (37, 700), (2000, 90)]
GEOMETRIES = [Geometry(64, 1.0), Geometry(64, 0.5, overlap=0.0), Geometry(64, 0.7, overlap=0.5),
              Geometry(32, 1.3, overlap=0.25), Geometry(64, 256 / 250)]


def plannable(h, w, g):
    try:
        return plan(h, w, g)
    except TilingError:
        return None


@pytest.mark.parametrize("g", GEOMETRIES, ids=str)
@pytest.mark.parametrize("hw", SIZES, ids=str)
def test_plan_invariants(hw, g):
    p = plannable(*hw, g)
    if p is None:
        return
    s = g.tile
    # the aspect ratio is kept (up to rounding), the scale is the bundle's unless upscaled to one tile
    assert min(p.h, p.w) >= s
    assert abs(p.h / p.w - hw[0] / hw[1]) <= (1 / p.w + 1 / p.h) * max(hw[0] / hw[1], 1) + 1e-9
    if round(min(hw) * g.scale) >= s:
        assert (p.h, p.w) == (round(hw[0] * g.scale), round(hw[1] * g.scale))
    else:
        assert min(p.h, p.w) == s and s / (min(hw) * g.scale) <= g.max_upscale + 1e-9
    for origins, length in ((p.ys, p.h), (p.xs, p.w)):
        assert origins[0] == 0 and origins[-1] == length - s
        steps = np.diff(origins)
        assert np.all(steps > 0) and np.all(steps <= s * (1 - g.overlap) + 1)  # overlap at least `overlap`
        assert steps.max() - steps.min() <= 1 if len(steps) else True  # evenly spaced
        if len(origins) > 2:  # not more tiles than needed: one fewer would break the overlap
            assert (length - s) / (len(origins) - 2) > s * (1 - g.overlap) - 1e-9
    cover = np.zeros((p.h, p.w), int)
    for y, x in p.origins:
        cover[y:y + s, x:x + s] += 1
    assert cover.min() >= 1  # every pixel is covered
    assert p.n_tiles == len(p.origins) <= g.max_tiles


def test_axis_origins_examples():
    assert axis_origins(64, 64, 0.25) == (0,)
    assert axis_origins(100, 64, 0.0) == (0, 36)
    assert axis_origins(128, 64, 0.0) == (0, 64)  # exact fit, no overlap needed
    assert axis_origins(128, 64, 0.25) == (0, 32, 64)
    assert axis_origins(635, 256, 0.25) == (0, 190, 379)  # a 250 x 620 KolektorSDD view: 3 tiles
    with pytest.raises(ValueError):
        axis_origins(63, 64, 0.25)


def test_default_scale_makes_a_median_image_one_tile_wide():
    assert choose_scale(256, [(512, 512)] * 3) == 0.5  # a 512 px bottle: exactly today's single tile
    g = choose_geometry(TilingOptions(), 256, [(620, 250), (630, 250), (640, 250)])
    assert g.scale == pytest.approx(256 / 250) and g.mode == "tile"
    p = plan(620, 250, g)
    assert (p.h, p.w, p.n_tiles) == (635, 256, 3)
    assert choose_geometry(TilingOptions(resolution=128), 256, [(512, 512)]).scale == 0.25
    assert choose_geometry(TilingOptions(scale=0.8, resolution=128), 256, [(512, 512)]).scale == 0.8
    assert choose_geometry(TilingOptions(mode="squash"), 256, [(620, 250)]) == Geometry.squash(256)


def test_scale_quantile_picks_which_short_side_fills_one_tile():
    sizes = [(100, 300), (200, 200), (400, 500), (512, 512), (60, 90)]  # short sides 60, 100, 200, 400, 512
    assert choose_scale(256, sizes, quantile=0.5) == 256 / 200  # the median
    assert choose_scale(256, sizes, quantile=1.0) == 0.5 and choose_scale(256, sizes, quantile=0.75) == 0.64
    assert choose_scale(256, sizes, quantile=0.0) == 256 / 60
    default = choose_scale(256, sizes, quantile=DEFAULT_SCALE_QUANTILE)
    assert choose_geometry(TilingOptions(), 256, sizes).scale == default
    assert choose_geometry(TilingOptions(scale_quantile=1.0, resolution=128), 256, sizes).scale == 0.25
    with pytest.raises(ValueError, match="quantile"):
        choose_scale(256, sizes, quantile=1.5)
    with pytest.raises(ValueError):
        TilingOptions(scale_quantile=-0.1)


def test_tiles_are_crops_of_the_pillow_resize():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (120, 300, 3), dtype=np.uint8)
    g = Geometry(64, 64 / 120)
    p = plan(120, 300, g)
    t = tiles(img, p)
    scaled = resize_rgb(img, (p.h, p.w))
    assert t.shape == (p.n_tiles, 64, 64, 3) and t.dtype == np.uint8
    for k, (y, x) in enumerate(p.origins):
        np.testing.assert_array_equal(t[k], scaled[y:y + 64, x:x + 64])


def test_a_single_tile_plan_is_the_squash_path():
    """A square image at the scale that makes it one tile is cut exactly as today's squash, and its
    stitched map is the tile map itself."""
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, (512, 512, 3), dtype=np.uint8)
    p = plan(512, 512, Geometry(256, 0.5))
    q = plan(512, 512, Geometry.squash(256))
    assert (p.h, p.w, p.n_tiles) == (q.h, q.w, q.n_tiles) == (256, 256, 1)
    np.testing.assert_array_equal(tiles(img, p)[0], resize_rgb(img, 256))
    np.testing.assert_array_equal(tiles(img, q)[0], resize_rgb(img, 256))
    m = rng.random((1, 256, 256), dtype=np.float32)
    np.testing.assert_array_equal(stitch(m, p), m[0])


def test_squash_resizes_any_shape_to_one_tile():
    p = plan(37, 700, Geometry.squash(64))
    assert (p.h, p.w, p.ys, p.xs) == (64, 64, (0,), (0,))
    img = np.zeros((37, 700, 3), np.uint8)
    np.testing.assert_array_equal(tiles(img, p)[0], resize_rgb(img, 64))


@pytest.mark.parametrize("hw", [(96, 300), (250, 630), (400, 400)])
def test_stitch_of_constant_tiles_is_constant_and_overlaps_average(hw):
    g = Geometry(64, 0.5, overlap=0.4)
    p = plan(*hw, g)
    const = np.full((p.n_tiles, 64, 64), 0.3, np.float32)
    out = stitch(const, p)
    assert out.shape == (p.h, p.w) and out.dtype == np.float32
    np.testing.assert_allclose(out, 0.3, rtol=1e-6)
    # tile k holds the value k: every pixel gets the mean of the tiles covering it
    vals = np.arange(p.n_tiles, dtype=np.float32)[:, None, None] * np.ones((1, 64, 64), np.float32)
    acc, cnt = np.zeros((p.h, p.w)), np.zeros((p.h, p.w))
    for k, (y, x) in enumerate(p.origins):
        acc[y:y + 64, x:x + 64] += k
        cnt[y:y + 64, x:x + 64] += 1
    np.testing.assert_allclose(stitch(vals, p), acc / cnt, rtol=1e-6)


def test_stitch_round_trip_of_a_smooth_map():
    """Cutting a map into the plan's tiles and stitching them back gives the map again."""
    g = Geometry(64, 64 / 120)
    p = plan(120, 300, g)
    yy, xx = np.mgrid[0:p.h, 0:p.w]
    full = (np.sin(yy / 9.0) + np.cos(xx / 13.0)).astype(np.float32)
    cut = np.stack([full[y:y + 64, x:x + 64] for y, x in p.origins])
    np.testing.assert_allclose(stitch(cut, p), full, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="shape"):
        stitch(cut[:-1], p)


def test_predict_maps_batches_tiles_across_images_and_stitches_in_order():
    g = Geometry(32, 1.0)
    images = [np.full((h, w, 3), v, np.uint8) for (h, w), v in (((32, 32), 10), ((32, 100), 20), ((70, 40), 30))]
    tiled = tile_images(images, g)
    calls = []

    def tile_fn(batch):
        calls.append(batch.shape)
        assert batch.dtype == np.uint8 and batch.shape[1:] == (3, 32, 32)
        return batch[:, 0].astype(np.float32)  # the map is the red channel

    maps = predict_maps(tile_fn, tiled, max_batch=3)
    assert [m.shape for m in maps] == [(32, 32), (32, 100), (70, 40)]
    assert [float(m.mean()) for m in maps] == [10.0, 20.0, 30.0]
    assert sum(c[0] for c in calls) == len(tiled.tiles) and max(c[0] for c in calls) <= 3
    sub = tiled.subset([2, 0])
    assert [p.height for p in sub.plans] == [70, 32] and len(sub.tiles) == sub.offsets[-1]
    assert [float(m.mean()) for m in predict_maps(tile_fn, sub)] == [30.0, 10.0]


def test_image_scores():
    m = np.zeros((10, 10), np.float32)
    m[0, :5] = [5, 4, 3, 2, 1]
    assert image_score(m) == 5.0
    assert image_score(m, ImageScore("topk_mean", 3)) == pytest.approx(4.0)
    assert image_score(m, ImageScore("topk_mean", 0.05)) == pytest.approx(3.0)  # 5 of 100 pixels
    assert image_score(m, ImageScore("topk_mean", 1e-9)) == 5.0  # at least one pixel
    assert image_score(m, ImageScore("topk_mean", 1000)) == pytest.approx(m.mean())  # at most all
    np.testing.assert_allclose(image_scores([m, m * 2]), [5.0, 10.0])
    for bad in (dict(method="median"), dict(topk=0), dict(topk=2.5), dict(topk=float("nan"))):
        with pytest.raises(ValueError):
            ImageScore(**bad)


def test_too_small_and_too_many_tiles_are_errors_naming_size_and_limit():
    g = Geometry(256, 256 / 250)
    with pytest.raises(TilingError) as e:
        plan(10000, 1, g)
    msg = str(e.value)
    assert "1 x 10000" in msg and "smaller than one tile" in msg and "2x" in msg and "125 px" in msg
    with pytest.raises(TilingError, match="100 x 100 .* smaller than one tile"):
        plan(100, 100, g)
    assert plan(125, 125, g).h == 256  # just inside max_upscale
    with pytest.raises(TilingError) as e:
        plan(300, 20000, g)
    msg = str(e.value)
    assert "20000 x 300" in msg and "tiles" in msg and "at most 64" in msg
    assert plan(300, 20000, Geometry(256, 256 / 250, max_tiles=500)).n_tiles > 64
    with pytest.raises(TilingError, match="no pixels"):
        plan(0, 5, g)
    assert issubclass(TilingError, ValueError)


def test_geometry_validation_and_manifest_round_trip():
    for bad in (dict(tile=0), dict(tile=64, scale=0), dict(tile=64, overlap=1.0), dict(tile=64, max_upscale=0.5),
                dict(tile=64, max_tiles=0), dict(tile=64, mode="stretch")):
        with pytest.raises(ValueError):
            Geometry(**bad)
    g = Geometry(64, 0.37, overlap=0.3, max_upscale=1.5, max_tiles=9)
    assert Geometry.from_dict(g.to_dict()) == g
    with pytest.raises(ValueError, match="unknown tiling field"):
        Geometry.from_dict({**g.to_dict(), "stride": 3})
    # a bundle's geometry and image score come from its typed manifest (tests/test_manifest.py has every format)
