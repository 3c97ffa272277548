"""The ONNX Runtime scorer: no torch, bytes and arrays, odd image modes, maps and PNGs, providers."""

from __future__ import annotations

import io
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("torch")

from stpm import bundle
from stpm.imaging.decode import ImageDecodeError
from stpm.runtime.scorer import Scorer
from stpm.runtime.sessions import choose_providers

sys.path.insert(0, str(Path(__file__).parent))
from test_export import SIZE, bottle_images, make_bundle, torch_scores


def png(arr: np.ndarray | Image.Image) -> bytes:
    buf = io.BytesIO()
    (arr if isinstance(arr, Image.Image) else Image.fromarray(arr)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def real():
    imgs, labels = bottle_images(3, 3)
    return [im[::4, ::4].copy() for im in imgs], labels  # 128 px: the runtime still resizes to SIZE


@pytest.fixture(scope="module")
def scorer(tmp_path_factory, real):
    path = make_bundle(tmp_path_factory.mktemp("models"), real[0], export=True)
    s = Scorer(path, providers=("auto",), intra_op_threads=1, max_batch=4)
    s.warmup()
    return s


def test_import_does_not_import_torch():
    code = ("import sys, stpm, stpm.runtime.scorer, stpm.runtime.choice, stpm.runtime.sessions, stpm.runtime.images, "
            "stpm.runtime.cpu, stpm.imaging.render, stpm.options, stpm.bundle.manifest, stpm.methods.registry\n"
            "assert 'torch' not in sys.modules, 'torch imported'; print('ok')")
    r = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True,
                       cwd=Path(__file__).resolve().parents[1], timeout=60)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr


def test_scores_match_torch_and_decisions(scorer, real):
    from stpm.methods.loading import load_map

    model = load_map(scorer.bundle_dir)[0].model
    ref = torch_scores(model, real[0])
    res = scorer.score(real[0], map_size=(SIZE, SIZE))
    raw = np.array([r.raw_score for r in res])
    span = scorer.threshold - scorer.low
    np.testing.assert_allclose(raw, ref, rtol=1e-4, atol=1e-3 * span)
    assert [r.is_anomaly for r in res] == list(ref >= scorer.threshold)
    # both sides by construction (make_bundle calibrates on the lower half of these very scores); the score
    # nearest the threshold lies 0.088 spans from it (AVX-512 and AVX2 alike), 88 x the tolerance above
    assert 0 < sum(r.is_anomaly for r in res) < len(res)
    for r in res:
        assert r.threshold == scorer.threshold and r.is_anomaly == (r.raw_score >= r.threshold)
        # at the model's own size the normalised map's maximum is the normalised score
        assert r.anomaly_map.dtype == np.float32 and 0.0 <= r.anomaly_map.min() <= r.anomaly_map.max() <= 1.0
        assert abs(float(r.anomaly_map.max()) - r.score) < 1e-4
        assert set(r.timings) == {"decode_ms", "infer_ms", "render_ms"}


def test_bytes_and_arrays_agree(scorer, real):
    imgs = real[0][:2]
    a = scorer.score(imgs)
    b = scorer.score([png(im) for im in imgs], names=["x.png", "y.png"])
    assert [r.name for r in b] == ["x.png", "y.png"] and [r.name for r in a] == ["image0", "image1"]
    np.testing.assert_allclose([r.raw_score for r in a], [r.raw_score for r in b], rtol=1e-6)
    assert all(r.anomaly_map is None and r.overlay_image is None and r.map_image is None for r in a)


def test_grayscale_rgba_16bit(scorer, real):
    rgb = real[0][0]
    gray = np.asarray(Image.fromarray(rgb).convert("L"))
    gray3 = np.repeat(gray[:, :, None], 3, axis=2)
    ref_gray = scorer.score([gray3])[0].raw_score
    rgba = np.concatenate([rgb, np.full(rgb.shape[:2] + (1,), 255, np.uint8)], axis=2)
    g16 = gray.astype(np.uint16) * 257
    inputs = {
        "gray array": gray, "gray [H,W,1]": gray[:, :, None], "gray png": png(gray),
        "16-bit array": g16, "16-bit png": png(Image.fromarray(g16.astype(np.int32), mode="I").convert("I;16")),
        "float array": gray.astype(np.float32) / 255.0,
    }
    for name, x in inputs.items():
        got = scorer.score([x])[0].raw_score
        assert got == pytest.approx(ref_gray, rel=1e-5), name
    ref_rgb = scorer.score([rgb])[0].raw_score
    for x in (rgba, png(rgba)):
        assert scorer.score([x])[0].raw_score == pytest.approx(ref_rgb, rel=1e-5)
    # transparent pixels composite on black, as stpm.imageio does for files
    half = rgba.copy()
    half[:, : rgb.shape[1] // 2, 3] = 0
    black = rgb.copy()
    black[:, : rgb.shape[1] // 2] = 0
    assert scorer.score([half])[0].raw_score == pytest.approx(scorer.score([png(half)])[0].raw_score, rel=1e-5)
    assert scorer.score([half])[0].raw_score == pytest.approx(scorer.score([black])[0].raw_score, rel=1e-5)


def test_overlay_and_map_png_sizes(scorer, real):
    im = real[0][3]
    r = scorer.score([png(im)], map_size="input", overlay=True, raw_map_png=True)[0]
    assert r.anomaly_map.shape == im.shape[:2]
    ov = Image.open(io.BytesIO(r.overlay_image))
    assert ov.mode == "RGB" and ov.size == (im.shape[1], im.shape[0])
    mp = Image.open(io.BytesIO(r.map_image))
    assert mp.mode == "L" and mp.size == ov.size
    np.testing.assert_allclose(np.asarray(mp) / 255.0, r.anomaly_map, atol=1 / 255 + 1e-6)

    r = scorer.score([im], map_size=(40, 70), overlay=True)[0]
    assert r.anomaly_map.shape == (40, 70)
    assert Image.open(io.BytesIO(r.overlay_image)).size == (70, 40)
    r = scorer.score([im], overlay=True)[0]  # no map requested: overlay at the input size
    assert r.anomaly_map is None and Image.open(io.BytesIO(r.overlay_image)).size == (im.shape[1], im.shape[0])
    with pytest.raises(ValueError):
        scorer.score([im], map_size="big")


def test_batching_is_invisible(scorer, real):
    imgs = real[0] * 2  # 12 images through max_batch=4
    many = scorer.score(imgs)
    single = [scorer.score([im])[0] for im in imgs[:3]]
    np.testing.assert_allclose([r.raw_score for r in many[:3]], [r.raw_score for r in single], rtol=1e-5)
    np.testing.assert_allclose([r.raw_score for r in many[:6]], [r.raw_score for r in many[6:]], rtol=1e-5)


def test_bad_inputs_raise_decode_errors(scorer):
    with pytest.raises(ImageDecodeError) as e:
        scorer.score([b"not an image"], names=["junk.png"])
    assert e.value.name == "junk.png"
    with pytest.raises(ImageDecodeError):
        scorer.score([np.zeros((4, 4, 5), np.uint8)])
    with pytest.raises(ImageDecodeError):
        scorer.score([np.zeros((4, 4), np.int64)])


def test_attributes_and_providers(scorer, caplog):
    m = bundle.read_manifest(scorer.bundle_dir)
    assert (scorer.name, scorer.version, scorer.image_size) == ("tiny", "v1", SIZE)
    assert scorer.threshold == m["calibration"]["threshold"] and scorer.manifest.to_dict() == m
    # whichever backend "auto" timed fastest on this machine, it runs on the CPU here
    assert scorer.providers[-1] == {"onnxruntime": "CPUExecutionProvider", "openvino": "CPU"}[scorer.backend]
    assert choose_providers(["auto"], ["CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    assert choose_providers(["auto"], ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]) == [
        "TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    with caplog.at_level(logging.WARNING, logger="stpm.runtime.sessions"):
        assert choose_providers(["cuda"], ["CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    assert "CUDAExecutionProvider is not available" in caplog.text
    with pytest.raises(ValueError):
        choose_providers(["gpu-please"], ["CPUExecutionProvider"])


def test_refuses_tampered_or_missing_graphs(scorer, tmp_path):
    import shutil

    copy = tmp_path / "b"
    shutil.copytree(scorer.bundle_dir, copy)
    s8 = Scorer(copy, precision="int8")  # no int8 in this bundle: fp32 with a warning, never an error
    assert s8.precision == "fp32" and any("int8" in w for w in s8.selection.warnings)
    with open(copy / "scorer.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(bundle.BundleError, match="sha256"):
        Scorer(copy)


def test_fp16_without_its_graph_is_refused_or_served_as_fp32(scorer, real, caplog):
    """A version without scorer_fp16.onnx (e.g. trained by POST /train): refused by name when fp16 is
    demanded without fallback; by default (the service's STPM_PRECISION=fp16 too) it is served by its
    fp32 graph, warned."""
    with pytest.raises(bundle.BundleError, match="no fp16 scorer"):
        Scorer(scorer.bundle_dir, precision="fp16", fall_back_to_fp32=False)
    with caplog.at_level(logging.WARNING, logger="stpm.runtime.choice"):
        s = Scorer(scorer.bundle_dir, precision="fp16", backend=scorer.backend)  # same engine: same numbers
    assert s.precision == "fp32" and "falling back to fp32" in caplog.text
    assert any("fp16" in w for w in s.selection.warnings)
    assert [r.score for r in s.score(real[0])] == [r.score for r in scorer.score(real[0])]


def test_files_are_scored_by_path_and_named_after_it(scorer, real, tmp_path):
    f = tmp_path / "part.png"
    f.write_bytes(png(real[0][0]))
    [by_path] = scorer.score([f])
    [by_bytes] = scorer.score([f.read_bytes()])
    assert by_path.name == str(f) and by_path.score == by_bytes.score
    with pytest.raises(ImageDecodeError, match="missing.png: cannot read the file"):
        scorer.score([tmp_path / "missing.png"])


def test_a_prepared_image_is_taken_as_it_is(scorer, real, monkeypatch):
    """read (header: size after EXIF orientation, tile plan) -> decode -> score: nothing planned or decoded
    twice, and the scores are those of the bytes scored directly."""
    from stpm.runtime import images

    im = real[0][1][:, :100]
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated: the header's width and height swap
    buf = io.BytesIO()
    Image.fromarray(im).save(buf, "JPEG", quality=95, exif=exif.tobytes())
    data = buf.getvalue()
    prepared = scorer.read(data, "rotated.jpg")
    assert prepared.size == (im.shape[1], im.shape[0]) and not prepared.decoded
    assert prepared.plan == scorer.plan(*prepared.size)
    plans = []
    monkeypatch.setattr(images, "plan", lambda *a: plans.append(a) or pytest.fail("planned again"))
    scorer.decode(prepared)
    assert prepared.decoded and prepared.rgb.shape[:2] == prepared.size and prepared.data is None
    [r] = scorer.score([prepared])
    monkeypatch.undo()
    assert r.name == "rotated.jpg" and not plans
    assert r.raw_score == pytest.approx(scorer.score([data])[0].raw_score, rel=1e-6)


def test_tiles_of_consecutive_images_share_batches():
    from stpm.imaging.geometry import batch_tiles

    groups = [np.full((n, 4, 4, 3), i, np.uint8) for i, n in enumerate((3, 1, 5))]
    drawn = []

    def lazily():
        for g in groups:
            drawn.append(len(drawn))
            yield g

    batches = []
    for batch, owners in batch_tiles(lazily(), max_batch=4):
        batches.append((batch.shape, owners, len(drawn)))
        assert batch.flags["C_CONTIGUOUS"] and list(batch[:, 0, 0, 0]) == owners
    assert batches == [((4, 3, 4, 4), [0, 0, 0, 1], 2), ((4, 3, 4, 4), [2, 2, 2, 2], 3), ((1, 3, 4, 4), [2], 3)]
    with pytest.raises(ValueError, match="max_batch"):
        next(batch_tiles(groups, max_batch=0))
