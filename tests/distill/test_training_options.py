"""Training options added for the full-scale reproductions: max-norm, in-memory batches, CPU bf16 autocast,
channels-last, the CUDA autocast dtype, and the per-class CIFAR subset reader."""
import numpy as np
import pytest
import torch
from torch import nn

import stpm.distill.methods as M
from stpm.distill import losses
from stpm.distill.data import TensorBatches, read_cifar10_tar
from stpm.distill.models import InputSpec, build_model
from stpm.distill.trainer import TrainConfig, apply_max_norm, fit

SPEC = InputSpec(1, 8, 10)


def test_max_norm_clips_only_the_units_above_it():
    layer = nn.Linear(4, 3, bias=False)
    conv = nn.Conv2d(2, 2, 3, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[3.0, 4.0, 0, 0], [0.3, 0.4, 0, 0], [0, 0, 6.0, 8.0]]))  # norms 5, 0.5, 10
        conv.weight.fill_(1.0)  # each filter has norm sqrt(18)
    apply_max_norm(nn.Sequential(layer, conv), 2.0)
    norms = layer.weight.norm(dim=1)
    assert torch.allclose(norms, torch.tensor([2.0, 0.5, 2.0]), atol=1e-5)
    assert torch.allclose(layer.weight[0], torch.tensor([1.2, 1.6, 0, 0]), atol=1e-5)  # direction kept
    assert torch.allclose(conv.weight.flatten(1).norm(dim=1), torch.full((2,), 2.0), atol=1e-5)


def test_fit_applies_max_norm_after_every_step(digits_batch):
    x, y = digits_batch
    model = build_model("mlp64d", SPEC)
    M.run(M.CrossEntropyObjective(model), x, y,
          M.RunConfig(TrainConfig(epochs=2, lr=0.5, optimizer="sgd", nesterov=True, max_norm=1.0), 16, 0),
          torch.device("cpu"))
    for m in model.modules():
        if isinstance(m, nn.Linear):
            assert m.weight.norm(dim=1).max() <= 1.0 + 1e-5


def test_tensor_batches_cover_every_row_once_per_epoch_and_are_seeded():
    x, y = torch.arange(10).float()[:, None], torch.arange(10)
    batches = TensorBatches(x, y, 4, shuffle=True, seed=3)
    epoch1, epoch2 = list(batches), list(batches)
    assert len(batches) == 3 and [len(b[1]) for b in epoch1] == [4, 4, 2]
    for epoch in (epoch1, epoch2):
        rows = torch.cat([b[1] for b in epoch])
        assert sorted(rows.tolist()) == list(range(10))
        assert all(torch.equal(bx[:, 0].long(), by) for bx, by in epoch)  # x and y stay paired
    assert not torch.equal(torch.cat([b[1] for b in epoch1]), torch.cat([b[1] for b in epoch2]))
    again = list(TensorBatches(x, y, 4, shuffle=True, seed=3))
    assert all(torch.equal(a[1], b[1]) for a, b in zip(epoch1, again))
    assert torch.equal(torch.cat([b[1] for b in TensorBatches(x, y, 4, shuffle=False)]), y)
    with pytest.raises(ValueError, match="differ in length"):
        TensorBatches(x, y[:5], 4)


def test_losses_are_float32_for_low_precision_logits():
    z_s = torch.randn(6, 10).to(torch.bfloat16)
    z_t = torch.randn(6, 10).to(torch.float16)
    y = torch.tensor([0, 1, 2, -1, 4, 5])
    assert losses.hinton_loss(z_s, z_t, y, 4.0, 0.5).dtype == torch.float32
    assert losses.hard_cross_entropy(z_s, y).dtype == torch.float32


def test_bf16_autocast_and_channels_last_train_on_cpu(digits_batch):
    x, y = digits_batch
    model = build_model("takd2x25", SPEC)
    cfg = TrainConfig(epochs=2, lr=3e-3, cpu_bf16=True, channels_last=True)
    hist = fit(M.CrossEntropyObjective(model), TensorBatches(x, y, 16), cfg, torch.device("cpu"))
    assert all(np.isfinite(hist.losses)) and hist.losses[-1] < hist.losses[0]
    conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    with pytest.raises(ValueError, match="amp_dtype"):
        fit(M.CrossEntropyObjective(model), TensorBatches(x, y, 16), TrainConfig(epochs=1, amp_dtype="int8"),
            torch.device("cpu"))


def test_cifar_reader_takes_the_first_images_of_each_class(cifar_dir):
    images, labels = read_cifar10_tar(cifar_dir / "test.tar.gz", per_class=3)
    assert images.shape == (30, 32, 32, 3)
    assert np.bincount(labels).tolist() == [3] * 10
