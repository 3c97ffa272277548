"""ONNX parity, the CLI on real (digits) data, the MNIST reader and split, model resolution, hooks."""
import json

import numpy as np
import pytest
import torch

from stpm.distill.data import (CIFAR10_CLASSES, deterministic_split, load_mnist, load_split, mnist_split, pool_split,
                               read_cifar10_tar, read_idx_gz)
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


def test_pool_split_is_disjoint_seeded_and_sized():
    tr, va = pool_split(100, 30, 20, seed=0)
    assert len(tr) == 30 and len(va) == 20 and not set(tr) & set(va)
    tr2, va2 = pool_split(100, 30, 20, seed=0)
    assert np.array_equal(tr, tr2) and np.array_equal(va, va2)
    assert not np.array_equal(pool_split(100, 30, 20, seed=1)[0], tr)
    assert len(pool_split(100, None, 20, seed=0)[0]) == 80
    with pytest.raises(ValueError):
        pool_split(100, 90, 20, seed=0)


def test_full_mnist_reader_and_official_split(mnist_dir):
    xtr, ytr, xte, yte = load_mnist(mnist_dir)
    assert xtr.shape == (60000, 28, 28) and xte.shape == (10000, 28, 28) and xtr.dtype == np.uint8
    assert np.bincount(ytr).tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    assert read_idx_gz(mnist_dir / "t10k-labels-idx1-ubyte.gz")[:5].tolist() == [7, 2, 1, 0, 4]
    s = mnist_split(n_train=1000, n_val=500, split_seed=3, raw_dir=mnist_dir)
    assert s.x_train.shape == (1000, 1, 28, 28) and s.x_val.shape == (500, 1, 28, 28)
    assert s.x_test.shape == (10000, 1, 28, 28)  # the official test set, whatever the split seed
    assert abs(float(s.x_test.mean())) < 0.1  # normalised with the MNIST mean/std
    f = s.fingerprint()
    assert f["data"] == "mnist" and f["split_seed"] == 3 and f["n_train"] == 1000 and f["n_val"] == 500
    assert mnist_split(1000, 500, 4, mnist_dir).fingerprint()["train_sha256"] != f["train_sha256"]


def test_mnist_md5_mismatch_is_an_error(tmp_path, mnist_dir):
    import shutil

    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
                 "t10k-labels-idx1-ubyte.gz"):
        shutil.copy(mnist_dir / name, tmp_path / name)
    with open(tmp_path / "t10k-labels-idx1-ubyte.gz", "ab") as f:
        f.write(b"x")
    with pytest.raises(ValueError, match="md5"):
        load_mnist(tmp_path)


def test_cifar10_tar_reader_on_real_members(cifar_dir, tmp_path):
    import io
    import tarfile

    from PIL import Image

    with tarfile.open(cifar_dir / "test.tar.gz") as tar:
        members = [m for m in tar.getmembers() if m.isfile()]
        assert len(members) == 10000
        assert {m.name.split("/")[1] for m in members} == set(CIFAR10_CLASSES)
        picked = [m for m in members if m.name.endswith(("/0000.jpg", "/0001.jpg"))]
        blobs = {m.name: tar.extractfile(m).read() for m in picked}
    small = tmp_path / "small.tar.gz"
    with tarfile.open(small, "w:gz") as out:
        for name, blob in blobs.items():
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            out.addfile(info, io.BytesIO(blob))
    images, labels = read_cifar10_tar(small)
    assert images.shape == (20, 32, 32, 3) and images.dtype == np.uint8
    assert labels.tolist() == [i for i in range(10) for _ in range(2)]  # members in name order
    first = sorted(blobs)[0]
    assert np.array_equal(images[0], np.asarray(Image.open(io.BytesIO(blobs[first])).convert("RGB")))


def test_digits_split_three_ways_and_unknown_data_is_an_error():
    s = load_split("digits", n_val=100, split_seed=0)
    assert len(s.y_test) == 397 and len(s.y_val) == 100 and len(s.y_train) == 1797 - 497
    assert load_split("digits", split_seed=1).fingerprint() != load_split("digits", split_seed=0).fingerprint()
    with pytest.raises(ValueError, match="unknown data"):
        load_split("imagenet")
    with pytest.raises(ValueError, match="data-dir"):
        load_split("folder", None)


def test_image_folder_split_reads_classes_and_splits(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls in ("cats", "dogs", "apples"):
        (tmp_path / cls).mkdir()
        for i in range(5):
            Image.fromarray(rng.integers(0, 255, (12, 10, 3), dtype=np.uint8)).save(tmp_path / cls / f"{i}.png")
    s = load_split("folder", tmp_path, image_size=16)
    assert s.num_classes == 3
    assert s.x_train.shape == (12, 3, 16, 16) and s.x_test.shape == (3, 3, 16, 16)
    assert sorted(torch.cat([s.y_train, s.y_test]).tolist()) == [0] * 5 + [1] * 5 + [2] * 5
    with pytest.raises(ValueError):
        load_split("folder", tmp_path / "missing")


def test_augmentations_move_and_mirror_whole_images():
    from stpm.distill.data import augmentation, random_flip, random_translate

    x = torch.zeros(64, 1, 9, 9)
    x[:, :, 4, 4] = 1.0  # one bright pixel in the middle
    g = torch.Generator().manual_seed(0)
    moved = random_translate(x, 2, generator=g)
    assert moved.shape == x.shape and torch.equal(moved.sum((1, 2, 3)), torch.ones(64))  # nothing lost at +-2
    rows, cols = moved[:, 0].sum(2).argmax(1), moved[:, 0].sum(1).argmax(1)
    assert set(rows.tolist()) <= set(range(2, 7)) and len(set(zip(rows.tolist(), cols.tolist()))) > 5
    ramp = torch.arange(9.0).expand(64, 1, 9, 9)
    flipped = random_flip(ramp, generator=torch.Generator().manual_seed(0))
    mirrored = (flipped[:, 0, 0, 0] == 8).sum().item()
    assert 10 < mirrored < 54 and torch.equal(flipped[flipped[:, 0, 0, 0] == 8], ramp.flip(-1)[:mirrored])
    assert augmentation("none") is None and augmentation("shift2") is not None
    with pytest.raises(ValueError):
        augmentation("rotate")


def test_takd_family_widths_layers_and_embedding():
    from stpm.distill.models import count_parameters, default_embedding_layer

    spec = InputSpec(3, 32, 10)
    sizes = [count_parameters(build_model(f"takd{d}", spec)) for d in (2, 4, 6, 8, 10)]
    assert sizes == sorted(sizes)  # deeper = larger, as in the TAKD paper's family
    m = build_model("takd10x50", spec)
    assert m.feature_layers == ("stages.0", "stages.1", "stages.2", "stages.3")
    assert default_embedding_layer(m) == "embed"
    hooks = FeatureHooks(m, ("stages.0", "embed"))
    assert m(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    assert hooks.outputs["stages.0"].shape == (2, 16, 32, 32) and hooks.outputs["embed"].shape == (2, 64)
    with pytest.raises(ValueError):
        build_model("takd3", spec)
