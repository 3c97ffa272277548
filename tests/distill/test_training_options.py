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
    # measured last / first: 0.916 (AVX-512/AMX and torch capped at AVX2 alike)
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


@pytest.mark.parametrize("tensor_batches", [True, False])
def test_a_killed_fit_resumes_from_its_last_epoch_and_ends_as_the_uninterrupted_run(digits_batch, tmp_path,
                                                                                    monkeypatch, tensor_batches):
    """Dropout, shift augmentation, shuffling, Adam and the cosine schedule all carry over a kill after epoch 2."""
    from stpm.distill import trainer

    x, y = digits_batch
    cfg = M.RunConfig(TrainConfig(epochs=3, lr=1e-2, lr_schedule="cosine", augment="shift1", max_norm=2.0), 16, 0,
                      tensor_batches=tensor_batches)

    def train(resume_path=None):
        torch.manual_seed(0)
        model = build_model("mlp64d", SPEC)
        hist = M.run(M.CrossEntropyObjective(model), x, y, cfg, torch.device("cpu"), eval_data=(x, y),
                     snapshot_epochs=(1,), resume_path=resume_path)
        return model, hist

    whole, whole_hist = train()
    state = tmp_path / "teacher.resume.pt"
    real_epoch, calls = trainer.train_one_epoch, []

    def killed_in_epoch_3(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt("killed")
        return real_epoch(*args, **kwargs)

    monkeypatch.setattr(trainer, "train_one_epoch", killed_in_epoch_3)
    with pytest.raises(KeyboardInterrupt):
        train(state)
    assert state.is_file()
    monkeypatch.setattr(trainer, "train_one_epoch", real_epoch)
    torch.manual_seed(123)  # the resumed process starts from other random states; the file restores them
    resumed, resumed_hist = train(state)
    assert not state.exists()
    for a, b in zip(whole.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)
    assert resumed_hist.losses == whole_hist.losses and resumed_hist.test_errors == whole_hist.test_errors
    assert all(torch.equal(a, b) for a, b in zip(whole_hist.snapshots[1].values(), resumed_hist.snapshots[1].values()))


def test_a_resume_file_from_other_settings_is_refused(digits_batch, tmp_path, monkeypatch):
    from stpm.distill import trainer

    x, y = digits_batch
    state = tmp_path / "run.resume.pt"
    real_epoch, calls = trainer.train_one_epoch, []

    def killed_in_epoch_2(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        return real_epoch(*args, **kwargs)

    monkeypatch.setattr(trainer, "train_one_epoch", killed_in_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        M.run(M.CrossEntropyObjective(build_model("mlp64", SPEC)), x, y, M.RunConfig(TrainConfig(epochs=2, lr=1e-2), 16),
              torch.device("cpu"), resume_path=state)
    monkeypatch.setattr(trainer, "train_one_epoch", real_epoch)
    with pytest.raises(ValueError, match=r"other settings .*'lr': \(0.01, 0.001\)"):
        M.run(M.CrossEntropyObjective(build_model("mlp64", SPEC)), x, y, M.RunConfig(TrainConfig(epochs=2, lr=1e-3), 16),
              torch.device("cpu"), resume_path=state)
