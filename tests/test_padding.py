"""Small images padded, not refused (stpm.imaging.geometry, small_images="pad"), without a model: plans,
reflect padding, which pixels and feature positions are the image's own, the stitched map cropped to them;
formats 1-2 (small_images="upscale") plan exactly as before. No torch."""

from __future__ import annotations

import numpy as np
import pytest

from stpm.imaging.decode import resize_rgb
from stpm.imaging.geometry import (
    Geometry,
    TilingError,
    plan,
    predict_maps,
    stitch,
    tile_boxes,
    tile_images,
    tiles,
    valid_grid,
)
from stpm.imaging.scores import ImageScore, image_score
from stpm.options import TilingOptions
from stpm.training.data import choose_geometry

PAD = [Geometry(64, 1.0, small_images="pad"), Geometry(64, 0.5, overlap=0.0, small_images="pad"),
       Geometry(32, 1.3, overlap=0.4, small_images="pad")]
SIZES = [(1, 1), (5, 300), (20, 20), (37, 700), (63, 64), (64, 64), (100, 30), (250, 630), (2000, 90)]


def own_pixels(p) -> np.ndarray:
    """bool [canvas_h, canvas_w]: where the scaled image lies on the canvas."""
    m = np.zeros((p.canvas_h, p.canvas_w), bool)
    m[p.top:p.top + p.h, p.left:p.left + p.w] = True
    return m


@pytest.mark.parametrize("g", PAD, ids=str)
@pytest.mark.parametrize("hw", SIZES, ids=str)
def test_pad_plans_keep_the_scale_and_centre_small_images_on_a_tile(hw, g):
    try:
        p = plan(*hw, g)
    except TilingError as e:  # only the tile budget refuses
        assert "max_tiles" in str(e)
        return
    s = g.tile
    assert (p.h, p.w) == (max(1, round(hw[0] * g.scale)), max(1, round(hw[1] * g.scale)))  # never upscaled
    assert (p.canvas_h, p.canvas_w) == (max(p.h, s), max(p.w, s))
    assert p.padded == (min(p.h, p.w) < s)
    assert (p.top, p.left) == ((p.canvas_h - p.h) // 2, (p.canvas_w - p.w) // 2)
    assert p.ys[-1] == p.canvas_h - s and p.xs[-1] == p.canvas_w - s
    # the boxes of own pixels, put back on the canvas, are exactly the image
    seen = np.zeros((p.canvas_h, p.canvas_w), bool)
    for (y, x), (y0, y1, x0, x1) in zip(p.origins, tile_boxes(p)):
        assert 0 <= y0 < y1 <= s and 0 <= x0 < x1 <= s  # every tile holds some of the image
        box = np.zeros((p.canvas_h, p.canvas_w), bool)
        box[y + y0:y + y1, x + x0:x + x1] = True
        assert np.array_equal(box & own_pixels(p), box)  # inside the image
        assert np.array_equal(own_pixels(p)[y:y + s, x:x + s], box[y:y + s, x:x + s])  # all of it in this tile
        seen |= box
    assert np.array_equal(seen, own_pixels(p))


def test_only_the_tile_budget_refuses_and_formats_1_2_still_upscale_or_refuse():
    pad = Geometry(256, 256 / 250, small_images="pad")
    assert plan(100, 100, pad).n_tiles == 1 and plan(10, 3, pad).padded  # refused by format 2, padded now
    with pytest.raises(TilingError) as e:
        plan(300, 20000, pad)
    assert "20000 x 300" in str(e.value) and "at most 64" in str(e.value)
    old = Geometry(256, 256 / 250)  # a format-2 manifest has no small_images: upscale by at most 2x, else refuse
    assert old.small_images == "upscale"
    with pytest.raises(TilingError, match="100 x 100 .* smaller than one tile"):
        plan(100, 100, old)
    p = plan(125, 200, old)
    assert (p.h, p.w, p.top, p.left, p.padded) == (256, 410, 0, 0, False)  # upscaled to one tile as before


def test_padded_tiles_are_the_resized_image_reflected_into_the_canvas():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (30, 90, 3), dtype=np.uint8)
    p = plan(30, 90, Geometry(64, 1.0, small_images="pad"))
    assert (p.h, p.w, p.canvas_h, p.canvas_w, p.top, p.n_tiles) == (30, 90, 64, 90, 17, 2)
    t = tiles(img, p)
    canvas = np.pad(resize_rgb(img, (30, 90)), ((17, 17), (0, 0), (0, 0)), mode="reflect")
    for k, (y, x) in enumerate(p.origins):
        np.testing.assert_array_equal(t[k], canvas[y:y + 64, x:x + 64])
    np.testing.assert_array_equal(t[0][17:47, :], img[:, :64])  # the image itself, unchanged, at the centre
    np.testing.assert_array_equal(t[0][16], img[1, :64])  # reflected: no constant border, no step


def test_a_padded_tile_map_counts_only_where_the_image_is():
    """Whatever a tile map holds where the mask says padding (here: huge values), the stitched map (the
    image's own h x w) and the image score are the same: padding never scores."""
    g = Geometry(64, 0.8, overlap=0.25, small_images="pad")
    for hw in ((40, 50), (30, 200), (200, 20)):
        p = plan(*hw, g)
        assert p.padded
        yy, xx = np.mgrid[0:p.canvas_h, 0:p.canvas_w]
        smooth = (np.sin(yy / 5.0) + np.cos(xx / 7.0)).astype(np.float32)
        clean = np.stack([smooth[y:y + 64, x:x + 64] for y, x in p.origins])
        poisoned = clean.copy()
        for k, (y0, y1, x0, x1) in enumerate(tile_boxes(p)):
            outside = np.ones((64, 64), bool)
            outside[y0:y1, x0:x1] = False
            poisoned[k][outside] = 1e6
        a, b = stitch(clean, p), stitch(poisoned, p)
        assert a.shape == b.shape == (p.h, p.w)
        np.testing.assert_array_equal(a, b)
        np.testing.assert_allclose(a, smooth[p.top:p.top + p.h, p.left:p.left + p.w], rtol=1e-6)
        for spec in (ImageScore("max"), ImageScore("topk_mean", 0.05)):
            assert image_score(b, spec) == image_score(a, spec) < 10


def test_valid_grid_takes_the_positions_whose_receptive_centre_is_inside():
    # a 64 px tile at stride 8: an 8 x 8 grid with centres at pixels 4, 12, ..., 60
    grid = valid_grid(np.array([[17, 47, 0, 64], [0, 64, 0, 64], [0, 5, 0, 4]]), 64, (8, 8))
    assert grid.shape == (3, 8, 8) and grid.dtype == bool
    assert grid[0].any(axis=1).tolist() == [False, False, True, True, True, True, False, False]  # 20..44 in 17..46
    assert grid[0].all(axis=0).sum() == 0 and grid[0][2:6].all()
    assert grid[1].all()
    assert grid[2].sum() == 0  # a sliver of 5 x 4 pixels holds no centre at this stride
    assert valid_grid(np.array([[0, 5, 0, 4]]), 64, (64, 64)).sum() == 20  # but every pixel at stride 1


def test_predict_maps_of_small_images_are_their_own_size():
    g = Geometry(32, 1.0, small_images="pad")
    images = [np.full((h, w, 3), v, np.uint8) for (h, w), v in (((10, 12), 10), ((5, 100), 20), ((40, 40), 30))]
    tiled = tile_images(images, g)
    assert tiled.padded and len(tiled.boxes()) == len(tiled.tiles)
    maps = predict_maps(lambda b: b[:, 0].astype(np.float32), tiled)
    assert [m.shape for m in maps] == [(10, 12), (5, 100), (40, 40)]
    assert [float(m.mean()) for m in maps] == [10.0, 20.0, 30.0]
    assert not tile_images(images[2:], g).padded


def test_new_training_runs_pad_and_the_geometry_round_trips():
    g = choose_geometry(TilingOptions(), 64, [(120, 300)] * 3)
    assert g.small_images == "pad" and Geometry.from_dict(g.to_dict()) == g
    assert choose_geometry(TilingOptions(small_images="upscale"), 64, [(120, 300)]).small_images == "upscale"
    with pytest.raises(ValueError, match="small_images"):
        Geometry(64, 1.0, small_images="stretch")
