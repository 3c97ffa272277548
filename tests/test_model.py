import pytest
import torch

from stpm.options import ModelOptions
from stpm.methods.stpm.loss import stpm_loss
from stpm.methods.stpm.model import build_stpm, student_layers


def tiny(backbone="resnet18", student=None):
    model, source = build_stpm(ModelOptions(method="stpm", backbone=backbone, student_backbone=student, pretrained=False,
                                           image_size=64), seed=0)
    assert source == "random-init"
    return model


def test_teacher_is_frozen_and_stays_in_eval_mode():
    model = tiny()
    model.train()
    assert not model.teacher.training
    assert model.student.training
    assert all(not p.requires_grad for p in model.teacher.parameters())
    before = {k: v.clone() for k, v in model.teacher.state_dict().items()}  # incl. BN running stats
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.4)
    for _ in range(2):
        t, s = model(torch.rand(2, 3, 64, 64))
        loss = stpm_loss(t, s)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert all(p.grad is None for p in model.teacher.parameters())
    for k, v in model.teacher.state_dict().items():
        assert torch.equal(v, before[k]), f"teacher tensor {k} changed"


def test_student_learns_while_teacher_stays():
    model = tiny()
    s0 = {k: v.clone() for k, v in model.student.state_dict().items()}
    opt = torch.optim.SGD(model.student.parameters(), lr=0.4)
    t, s = model(torch.rand(2, 3, 64, 64))
    stpm_loss(t, s).backward()
    opt.step()
    assert any(not torch.equal(v, s0[k]) for k, v in model.student.state_dict().items())


def test_pyramid_strides_are_4_8_16():
    model = tiny()
    t, s = model(torch.rand(1, 3, 64, 64))
    assert [f.shape[-1] for f in t] == [16, 8, 4]
    assert [f.shape for f in t] == [f.shape for f in s]


def test_different_student_projects_to_teacher_channels():
    model = tiny("efficientnet_lite0", "resnet18")
    t, s = model(torch.rand(1, 3, 64, 64))
    assert [f.shape for f in t] == [f.shape for f in s]
    assert [f.shape[1] for f in t] == [24, 40, 112]
    assert student_layers("efficientnet_lite0", "resnet18", ("blocks.1", "blocks.2", "blocks.4")) == (
        "layer1", "layer2", "layer3")


def test_unknown_backbone_and_layer_are_named():
    """The options refuse them (so no model is ever built from them); the extractor names them too."""
    from stpm.methods import backbones

    with pytest.raises(ValueError, match="backbone"):
        ModelOptions(method="stpm", backbone="vgg", pretrained=False)
    with pytest.raises(ValueError, match="resnet18 has no feature layer layer9"):
        ModelOptions(method="stpm", backbone="resnet18", layers=("layer9",), pretrained=False)
    with pytest.raises(ValueError, match="unknown backbone 'vgg'"):
        backbones.build_features("vgg", ())
