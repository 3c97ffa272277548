"""Each method: one step runs on a tiny real batch (sklearn digits), its loss falls over a few steps,
and the teacher never changes."""

import pytest
import torch

from stpm.distill import methods as M
from stpm.distill.models import InputSpec, build_model
from stpm.distill.trainer import FrozenTeacher, TrainConfig, make_optimizer, trainable_parameters

SPEC = InputSpec(1, 8, 10)


def _teacher(name, x, y, steps=30):
    torch.manual_seed(1)
    t = build_model(name, SPEC)
    obj = M.CrossEntropyObjective(t)
    opt = make_optimizer(trainable_parameters(obj), TrainConfig(lr=3e-3))
    for _ in range(steps):
        opt.zero_grad()
        obj(x, y).backward()
        opt.step()
    return t


@pytest.fixture(scope="module")
def teachers(digits_batch):
    x, y = digits_batch
    return {"cnn4": _teacher("cnn4", x, y), "mlp64": _teacher("mlp64", x, y)}


def _state(m):
    return {k: v.clone() for k, v in m.state_dict().items()}


def _objectives(x, y, teachers):
    torch.manual_seed(0)
    cnn_t, mlp_t = teachers["cnn4"], teachers["mlp64"]
    s = lambda name="cnn2": build_model(name, SPEC)  # noqa: E731
    aligner = lambda: M.LatentAligner((64, 32 * 4 * 4), latent_dim=8, hidden=32)  # noqa: E731
    return {
        "ce": lambda: (M.CrossEntropyObjective(s()), []),
        "kd": lambda: (M.KDObjective(s(), cnn_t, 4.0, 0.5), [cnn_t]),
        "semi_kd": lambda: (M.KDObjective(s(), cnn_t, 4.0, 0.5), [cnn_t]),  # half the labels hidden below
        "logit_mse": lambda: (M.LogitMatchingObjective(s(), cnn_t, 0.5), [cnn_t]),
        "dkd": lambda: (M.DKDObjective(s(), cnn_t, 4.0, 1.0, 8.0, 1.0), [cnn_t]),
        "fitnets": lambda: (M.FitNetObjective(s(), cnn_t, "stage2", "stage2", x[:4], 1.0), [cnn_t]),
        "fitnets_mlp_to_cnn": lambda: (M.FitNetObjective(s("mlp16"), mlp_t, "body", "body", x[:4], 1.0), [mlp_t]),
        "at": lambda: (M.AttentionTransferObjective(s(), cnn_t, ("stage1", "stage2"), ("stage1", "stage2"), 1000.0),
               [cnn_t]),
        "fsp": lambda: (M.FSPObjective(s(), cnn_t, ("stage1", "stage2"), ("stage1", "stage2"), 1.0), [cnn_t]),
        "fsp_narrow_student": lambda: (M.FSPObjective(s("cnn2x8"), cnn_t, ("stage1", "stage2"), ("stage1", "stage2"),
                                                      1.0, example=x[:4]), [cnn_t]),
        "mutual": lambda: (M.MutualObjective([s(), s("mlp32"), s("cnn4")], 1.0), []),
        "multi_teacher": lambda: (M.MultiTeacherKD(s(), [cnn_t, mlp_t], 4.0, 0.5), [cnn_t, mlp_t]),
        "disjoint": lambda: (M.DisjointMergeKD(s(), [_half(cnn_t, 0), _half(mlp_t, 5)], [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]],
                                       10, 2.0), [cnn_t, mlp_t]),
        "aligner": lambda: (M.AlignerObjective(aligner(), [mlp_t, cnn_t], ("body", "stage2"), 0.5, 1.0), [mlp_t, cnn_t]),
        "latent_kd": lambda: (M.LatentKDObjective(s("mlp16"), "body", 16, [mlp_t, cnn_t], ("body", "stage2"), aligner(), 8,
                                          4.0, 0.5, 1.0), [mlp_t, cnn_t]),
        "sp": lambda: (M.SPObjective(s(), cnn_t, ("stage1", "stage2"), ("stage1", "stage2"), 3000.0), [cnn_t]),
        "cc": lambda: (M.CCObjective(s(), cnn_t, "stage2", "stage2", x[:4], 1.0), [cnn_t]),
        "vid": lambda: (M.VIDObjective(s(), cnn_t, ("stage1", "stage2"), ("stage1", "stage2"), x[:4], 1.0), [cnn_t]),
        "vid_mlp": lambda: (M.VIDObjective(s("mlp16"), mlp_t, ("body",), ("body",), x[:4], 1.0), [mlp_t]),
        "rkd": lambda: (M.RKDObjective(s(), cnn_t, "stage2", "stage2", 1.0), [cnn_t]),
        "rkd_mlp": lambda: (M.RKDObjective(s("mlp16"), mlp_t, "body", "body", 1.0), [mlp_t]),
        "pkt": lambda: (M.PKTObjective(s(), cnn_t, "stage2", "stage2", 30000.0), [cnn_t]),
        "nst": lambda: (M.NSTObjective(s(), cnn_t, ("stage1", "stage2"), ("stage1", "stage2"), 50.0), [cnn_t]),
        "crd": lambda: (M.CRDObjective(s(), cnn_t, "stage2", "stage2", x[:4], 0.8, bank_size=32), [cnn_t]),
        "reviewkd": lambda: (M.ReviewKDObjective(s(), cnn_t, ("stage1", "stage2"), ("stage1", "stage2"), x[:4], 1.0),
                             [cnn_t]),
    }


class _Half(torch.nn.Module):
    """A teacher restricted to five of its outputs (stands in for a teacher trained on one half)."""

    def __init__(self, model, start):
        super().__init__()
        self.model, self.start = model, start

    def forward(self, x):
        return self.model(x)[:, self.start:self.start + 5]


def _half(model, start):
    return _Half(model, start)


NAMES = ["ce", "kd", "semi_kd", "logit_mse", "dkd", "fitnets", "fitnets_mlp_to_cnn", "at", "fsp", "fsp_narrow_student", "mutual",
         "multi_teacher", "disjoint", "aligner", "latent_kd", "sp", "cc", "vid", "vid_mlp", "rkd", "rkd_mlp", "pkt",
         "nst", "crd", "reviewkd"]


@pytest.mark.parametrize("name", NAMES)
def test_method_lowers_its_loss_and_leaves_teachers_unchanged(name, digits_batch, teachers):
    x, y = digits_batch
    if name == "semi_kd":
        y = y.clone()
        y[::2] = -1
    obj, teacher_list = _objectives(x, y, teachers)[name]()
    before = [_state(t) for t in teacher_list]
    opt = make_optimizer(trainable_parameters(obj), TrainConfig(lr=3e-3))
    obj.train()
    torch.manual_seed(0)
    losses = []
    for _ in range(8):
        opt.zero_grad()
        loss = obj(x, y)
        assert loss.ndim == 0 and torch.isfinite(loss)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    # measured last / first: 0.37-0.94 over the methods (latent_kd 0.943 the highest), the same to 1e-6
    # with torch capped at AVX2
    assert losses[-1] < losses[0], losses
    for t, b in zip(teacher_list, before):
        for k, v in t.state_dict().items():
            torch.testing.assert_close(v, b[k], rtol=0, atol=0, msg=f"teacher tensor {k} changed")
    for t in teacher_list:
        assert not any(p.requires_grad for p in t.parameters())


def test_frozen_teacher_stays_in_eval_mode_and_gets_no_gradients(digits_batch):
    x, y = digits_batch
    torch.manual_seed(0)
    teacher = build_model("mlp64d", SPEC)  # dropout: eval mode makes it deterministic
    obj = M.KDObjective(build_model("mlp16", SPEC), teacher, 4.0, 0.5)
    obj.train()
    assert obj.student.training
    assert not obj.teacher.training and not teacher.training
    assert torch.equal(obj.teacher(x), obj.teacher(x))
    assert isinstance(obj.teacher, FrozenTeacher)
    obj.teacher.train(True)
    assert not teacher.training
    obj(x, y).backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.requires_grad is False for p in teacher.parameters())


def test_takd_chain_and_eskd_and_noisy_student_run_end_to_end(digits_batch):
    x, y = digits_batch
    cfg = M.RunConfig(TrainConfig(epochs=2, lr=3e-3), batch_size=16, seed=0)
    dev = torch.device("cpu")
    torch.manual_seed(0)
    chain = [build_model(n, SPEC) for n in ("cnn6", "cnn4", "cnn2")]
    hists = M.takd_chain(chain, x, y, cfg, dev, temperature=4.0, hard_weight=0.5, train_first=True,
                         eval_data=(x, y))
    assert len(hists) == 3 and all(len(h.losses) == 2 for h in hists)
    assert all(h.losses[-1] < h.losses[0] for h in hists)
    # ESKD: keep the epoch-1 teacher snapshot and distil from it
    teacher = build_model("mlp32", SPEC)
    hist = M.train_classifier(teacher, x, y, cfg, dev, snapshot_epochs=(1, 2))
    early = M.eskd_teacher(lambda: build_model("mlp32", SPEC), hist.snapshots, 1)
    assert not torch.equal(early.head.weight, teacher.head.weight)
    torch.testing.assert_close(M.eskd_teacher(lambda: build_model("mlp32", SPEC), hist.snapshots, 2).head.weight,
                               teacher.head.weight)
    with pytest.raises(KeyError):
        M.eskd_teacher(lambda: build_model("mlp32", SPEC), hist.snapshots, 5)
    # Noisy Student: two iterations on pseudo-labels of "unlabelled" images
    ns = M.NoisyStudentConfig(iterations=2, soft=False, temperature=1.0, max_shift=1, noise_std=0.1)
    out = M.noisy_student(teacher, lambda: build_model("mlp32d", SPEC), x[:32], y[:32], x[32:], ns, cfg, dev,
                          eval_data=(x, y))
    assert len(out) == 2 and out[0][0] is not out[1][0]
    targets = M.pseudo_labels(teacher, x[32:], dev, 1.0, soft=False)
    assert torch.equal(targets.argmax(-1), teacher.eval()(x[32:]).argmax(-1))


def test_crd_bank_fills_in_training_only_and_wraps(digits_batch, teachers):
    x, y = digits_batch
    torch.manual_seed(0)
    obj = M.CRDObjective(build_model("cnn2", SPEC), teachers["cnn4"], "stage2", "stage2", x[:4], 0.8, bank_size=40)
    obj.eval()
    obj(x[:16], y[:16])
    assert int(obj.filled) == 0
    obj.train()
    obj(x[:16], y[:16])
    assert int(obj.filled) == 16 and int(obj.cursor) == 16
    obj(x[:32], y[:32])
    assert int(obj.filled) == 40 and int(obj.cursor) == 8  # 16 + 32 = 48 -> wrapped


STOCK_METHODS = ["fitnets", "at", "fsp", "sp", "cc", "vid", "rkd", "pkt", "nst", "crd", "reviewkd"]


@pytest.mark.parametrize("method", STOCK_METHODS)
def test_new_methods_run_on_stock_torchvision_and_timm_models(method, digits_batch):
    """The same API on stock models: a torchvision ResNet-18 student learns from a timm ResNet-10t teacher,
    default layers (layer1..4, avgpool / global_pool) resolved by name."""
    from stpm.distill.cli import KDSettings, make_objective
    from stpm.distill.models import default_embedding_layer, default_feature_layers

    x, y = digits_batch
    x = torch.nn.functional.interpolate(x[:16], size=32, mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
    y = y[:16]
    spec = InputSpec(3, 32, 10)
    torch.manual_seed(0)
    student, teacher = build_model("torchvision:resnet18", spec), build_model("timm:resnet10t", spec)
    assert default_embedding_layer(student) == "avgpool" and default_embedding_layer(teacher) == "global_pool"
    obj = make_objective(KDSettings(method=method), student, teacher, x[:4], default_feature_layers(student),
                         default_feature_layers(teacher))
    before = _state(teacher)
    opt = make_optimizer(trainable_parameters(obj), TrainConfig(lr=1e-3))
    obj.train()
    for _ in range(2):
        opt.zero_grad()
        loss = obj(x, y)
        assert loss.ndim == 0 and torch.isfinite(loss)
        loss.backward()
        opt.step()
    assert all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())


def test_cached_objectives_equal_their_live_counterparts(digits_batch, teachers):
    """Precomputed teacher outputs give the same loss as running the frozen teachers (no augmentation)."""
    from stpm.distill import losses
    from stpm.distill.features import FeatureHooks

    x, y = digits_batch
    cnn_t, mlp_t = teachers["cnn4"], teachers["mlp64"]
    halves = [_half(cnn_t, 0), _half(mlp_t, 5)]
    classes = [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
    torch.manual_seed(0)
    student = build_model("cnn2", SPEC)
    live = M.DisjointMergeKD(student, halves, classes, 10, 2.0, "energy").eval()
    with torch.no_grad():
        target = losses.merge_disjoint_probs([h(x) for h in halves], classes, 10, 2.0, "energy")
    cached = M.SoftLabelObjective(student, 0, 0.0, temperature=2.0).eval()
    torch.testing.assert_close(cached(x, target), live(x, y))
    # aligner: concatenated cached features == hooks on the live teachers (same random negatives)
    torch.manual_seed(0)
    aligner = M.LatentAligner((64, 32 * 4 * 4), latent_dim=8, hidden=32)
    live_al = M.AlignerObjective(aligner, [mlp_t, cnn_t], ("body", "stage2"), 0.5, 1.0)
    hooks = [FeatureHooks(mlp_t, ("body",)), FeatureHooks(cnn_t, ("stage2",))]
    with torch.no_grad():
        mlp_t(x), cnn_t(x)
    feats = [h.features()[0].flatten(1) for h in hooks]
    cached_al = M.CachedAlignerObjective(aligner, (64, 512), 0.5, 1.0)
    torch.manual_seed(1)
    a = live_al(x, y)
    torch.manual_seed(1)
    torch.testing.assert_close(cached_al(torch.cat(feats, 1), y), a)
    codes = M.shared_codes(aligner, feats)
    torch.testing.assert_close(codes.norm(dim=1), torch.ones(len(x)))
    # the latent student objective: soft CE + latent term, both parts used
    obj = M.CachedLatentKDObjective(build_model("mlp16", SPEC), "body", 16, 10, 8, 2.0, 1.0)
    packed = torch.cat([target, codes], 1)
    total = obj(x, packed)
    soft = losses.soft_cross_entropy(obj.student(x), target, 2.0)
    assert total.item() > soft.item()


def test_warmup_rises_linearly_over_its_steps_then_follows_the_schedule():
    from stpm.distill.trainer import make_scheduler

    def lrs(cfg: TrainConfig, steps: int) -> list[float]:
        opt = make_optimizer(list(build_model("mlp16", SPEC).parameters()), cfg)
        sched = make_scheduler(opt, cfg, steps_per_epoch=4)
        out = [opt.param_groups[0]["lr"]]
        for _ in range(steps - 1):
            opt.step()
            sched.step()
            out.append(opt.param_groups[0]["lr"])
        return out

    const = lrs(TrainConfig(epochs=3, lr=0.1, warmup_epochs=1.0), 12)  # 4 warmup steps, then constant
    assert const[:5] == pytest.approx([0.025, 0.05, 0.075, 0.1, 0.1]) and const[-1] == pytest.approx(0.1)
    cos, plain = (lrs(TrainConfig(epochs=3, lr=0.1, lr_schedule="cosine", warmup_epochs=w), 12) for w in (1.0, 0.0))
    assert cos[0] == pytest.approx(plain[0] / 4) and cos[4:] == pytest.approx(plain[4:])  # the decay after it
    assert cos[:4] == sorted(cos[:4]) and cos[3] == pytest.approx(plain[3])


def test_cosine_schedule_decays_the_learning_rate_to_zero(digits_batch):
    from stpm.distill.trainer import make_scheduler

    x, y = digits_batch
    cfg = TrainConfig(epochs=3, lr=1e-2, lr_schedule="cosine")
    opt = make_optimizer(list(build_model("mlp16", SPEC).parameters()), cfg)
    sched = make_scheduler(opt, cfg, steps_per_epoch=4)
    lrs = []
    for _ in range(12):
        opt.step()
        sched.step()
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs == sorted(lrs, reverse=True) and lrs[-1] < 1e-12 and abs(lrs[5] - 5e-3) < 1e-3
    assert make_scheduler(opt, TrainConfig(), 4) is None
    with pytest.raises(ValueError):
        make_scheduler(opt, TrainConfig(lr_schedule="step"), 4)
    hist = M.run(M.CrossEntropyObjective(build_model("mlp16", SPEC)), x, y,
                 M.RunConfig(TrainConfig(epochs=2, lr=3e-3, lr_schedule="cosine"), 16, 0), torch.device("cpu"))
    assert hist.losses[-1] < hist.losses[0]  # measured 0.986 (AVX-512/AMX and AVX2 alike: tiny MLP)
