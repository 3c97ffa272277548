"""ONNX parity, the CLI on real (digits) data, the MNIST reader and split, model resolution, hooks."""
import json

import numpy as np
import pytest
import torch

from stpm.distill.data import deterministic_split, load_mnist_test10k, mnist_split, read_idx_gz
from stpm.distill.export import check_parity, export_classifier_onnx, onnx_logits
from stpm.distill.features import FeatureHooks, torchvision_feature_extractor
from stpm.distill.models import InputSpec, build_model, default_feature_layers


@pytest.mark.parametrize("name", ["mlp30", "cnn4"])
def test_onnx_export_matches_torch_with_dynamic_batch(name, digits_batch, tmp_path):
    x, _ = digits_batch
    torch.manual_seed(0)
    model = build_model(name, InputSpec(1, 8, 10)).eval()
    path = export_classifier_onnx(model, x[:2], tmp_path / f"{name}.onnx")
    assert check_parity(model, path, x[:5]) < 1e-4
    out = onnx_logits(path, x[:37].numpy())  # a batch size never seen at export
    with torch.no_grad():
        np.testing.assert_allclose(out, model(x[:37]).numpy(), atol=1e-4, rtol=1e-4)


def test_cli_kd_on_digits_writes_checkpoint_report_and_onnx(tmp_path, capsys):
    from stpm.distill.cli import main

    out = tmp_path / "student.pt"
    rc = main(["distill", "kd", "--teacher", "mlp64", "--student", "mlp16", "--data", "digits", "--epochs", "2",
               "--temperature", "4", "--hard-weight", "0.3", "--out", str(out), "--onnx", str(tmp_path / "s.onnx"),
               "--no-progress", "--device", "cpu"])
    assert rc == 0 and out.is_file()
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["test_images"] == 397 and 0.0 <= report["test_accuracy"] <= 1.0
    assert report["onnx_max_abs_diff"] < 1e-4
    # a sub-command registered into a parent parser keeps working; export reloads the weights
    rc = main(["export", "--model", "mlp16", "--weights", str(out), "--data", "digits",
               "--out", str(tmp_path / "again.onnx")])
    assert rc == 0 and (tmp_path / "again.onnx").is_file()


def test_cli_register_adds_distill_with_func():
    import argparse

    from stpm.distill.cli import register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["distill", "takd", "--path", "cnn6,cnn4,cnn2", "--out", "x.pt"])
    assert callable(args.func) and args.path == "cnn6,cnn4,cnn2"
    with pytest.raises(SystemExit):
        parser.parse_args(["distill", "kd", "--teacher", "a", "--student", "b", "--method", "bogus", "--out", "x"])


def test_model_resolution_by_name_and_import_path():
    spec = InputSpec(1, 28, 10)
    x = torch.zeros(2, 1, 28, 28)
    for name in ("mlp1200d", "mlp30", "cnn10", "cnn2x8"):
        assert build_model(name, spec)(x).shape == (2, 10)
    rgb = build_model("torchvision.models:resnet18", InputSpec(3, 32, 7))  # "module:attr" import path
    assert rgb(torch.zeros(2, 3, 32, 32)).shape == (2, 7)
    with pytest.raises(TypeError):  # OrderedDict(num_classes=...) is not an nn.Module
        build_model("collections:OrderedDict", spec)
    assert build_model("torchvision:resnet18", spec)(x).shape == (2, 10)
    assert default_feature_layers(build_model("torchvision:resnet18", spec))[0] == "model.layer1"
    with pytest.raises(ValueError):
        build_model("nonsense", spec)


def test_timm_model_and_hooks_and_torchvision_extractor_agree():
    import torchvision

    spec = InputSpec(3, 32, 5)
    model = build_model("timm:resnet10t", spec).eval()
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 5)
    tv = torchvision.models.resnet18(num_classes=5).eval()
    x = torch.randn(2, 3, 32, 32)
    extractor = torchvision_feature_extractor(tv, ("layer1", "layer3"))
    hooks = FeatureHooks(tv, ("layer1", "layer3"))
    with torch.no_grad():
        tv(x)
        extracted = extractor(x)
    for name in ("layer1", "layer3"):
        torch.testing.assert_close(hooks.outputs[name], extracted[name])
    hooks.close()


def test_deterministic_split_is_a_seeded_partition():
    tr, te = deterministic_split(100, 80, seed=0)
    tr2, _ = deterministic_split(100, 80, seed=0)
    assert np.array_equal(tr, tr2) and len(te) == 20
    assert sorted(np.concatenate([tr, te]).tolist()) == list(range(100))


def test_mnist_reader_md5_and_8000_2000_split(mnist_dir):
    images, labels = load_mnist_test10k(mnist_dir)
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (10000,) and set(np.unique(labels).tolist()) == set(range(10))
    assert read_idx_gz(mnist_dir / "t10k-labels-idx1-ubyte.gz")[:5].tolist() == [7, 2, 1, 0, 4]
    s = mnist_split(8000, split_seed=0, raw_dir=mnist_dir)
    assert s.x_train.shape == (8000, 1, 28, 28) and s.x_test.shape == (2000, 1, 28, 28)
    assert abs(float(s.x_train.mean())) < 0.1  # normalised with the MNIST mean/std


def test_mnist_md5_mismatch_is_an_error(tmp_path, mnist_dir):
    import shutil

    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        shutil.copy(mnist_dir / name, tmp_path / name)
    with open(tmp_path / "t10k-labels-idx1-ubyte.gz", "ab") as f:
        f.write(b"x")
    with pytest.raises(ValueError, match="md5"):
        load_mnist_test10k(tmp_path)


def test_image_folder_split_reads_classes_and_splits(tmp_path):
    from PIL import Image

    from stpm.distill.data import load_split

    rng = np.random.default_rng(0)
    for cls in ("cats", "dogs", "apples"):
        (tmp_path / cls).mkdir()
        for i in range(5):
            Image.fromarray(rng.integers(0, 255, (12, 10, 3), dtype=np.uint8)).save(tmp_path / cls / f"{i}.png")
    s = load_split(str(tmp_path), None, image_size=16)
    assert s.num_classes == 3
    assert s.x_train.shape == (12, 3, 16, 16) and s.x_test.shape == (3, 3, 16, 16)
    assert sorted(torch.cat([s.y_train, s.y_test]).tolist()) == [0] * 5 + [1] * 5 + [2] * 5
    with pytest.raises(ValueError):
        load_split(str(tmp_path / "missing"), None)
