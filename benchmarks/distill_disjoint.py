"""Seed 003 (teachers with disjoint label sets merged into one student) and seed 004 (the teachers' latent
spaces aligned by an autoencoder with a triplet loss), on MNIST and CIFAR-10.

Teacher A learns classes 0-4 and teacher B classes 5-9, each from the labelled training images of its own
classes only, with different architectures (MNIST: 2 x 300 MLP and a 4-conv plain CNN; CIFAR-10: the TAKD
plain CNNs with 4 and 6 convs). One 10-way student learns from all training images without any label:
- merged [confidence] / [energy]: the teachers' softened outputs placed at their classes and weighted per
  image by their max probability, or by a softmax over the concatenated logits (losses.merge_disjoint_probs);
- merged [energy + latent alignment] (seed 004): an autoencoder per teacher maps its embedding into one
  32-d unit-norm latent space, trained with reconstruction + triplet loss (positive: the other teacher's code
  of the same image; negative: the other teacher's code of an image the merged teachers put in another class,
  so no label is used); the student matches the merged targets and, through a learned projection of its
  embedding, the teachers' mean code.
A student trained with all labels is the reference. Teacher outputs and features are computed once (no
augmentation), so the students' losses equal those of the live-teacher objectives.

python benchmarks/distill_disjoint.py [--seeds 0 1 2] [--datasets mnist cifar10]
"""
from __future__ import annotations

import torch
from distill_common import CIFAR_CACHE, Results, accuracy, parse_args, seed_all, update_doc

from stpm.distill import losses
from stpm.distill.data import cifar10_split, mnist_split
from stpm.distill.features import FeatureHooks
from stpm.distill.methods import (CachedAlignerObjective, CachedLatentKDObjective, CrossEntropyObjective,
                                  LatentAligner, RunConfig, SoftLabelObjective, run, shared_codes)
from stpm.distill.models import InputSpec, build_model, default_embedding_layer
from stpm.distill.trainer import TrainConfig, predict_logits

HALVES = {"A (classes 0-4)": list(range(0, 5)), "B (classes 5-9)": list(range(5, 10))}
SETUPS = {  # teachers A, B, student, training images, teacher epochs, student epochs
    "mnist": {"teachers": ("mlp300", "takd4x50"), "student": "mlp300", "n_train": 20000, "teacher_epochs": 6,
              "epochs": 6},
    "cifar10": {"teachers": ("takd4x50", "takd6x50"), "student": "takd4x50", "n_train": 8000,
                "teacher_epochs": 12, "epochs": 8},
}
T, LATENT_DIM, MARGIN, LATENT_WEIGHT, ALIGNER_EPOCHS = 2.0, 32, 0.5, 1.0, 20
STUDENTS = ("confidence", "energy", "energy + latent alignment")


@torch.no_grad()
def embeddings(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The model's embedding-layer output for all of x, flattened. [N, ...] -> [N, D]."""
    hooks = FeatureHooks(model, (default_embedding_layer(model),))
    model.eval()
    out = []
    for i in range(0, len(x), 1000):
        model(x[i:i + 1000])
        out.append(hooks.features()[0].flatten(1))
    hooks.close()
    return torch.cat(out)


def one_dataset(ds: str, seed: int, res: Results) -> None:
    setup = SETUPS[ds]
    data = (mnist_split(setup["n_train"], 0, 0) if ds == "mnist" else
            cifar10_split(setup["n_train"], 0, 0, cache=CIFAR_CACHE))
    res.data.setdefault("data", {})[ds] = data.description
    spec = InputSpec(data.x_train.shape[1], data.x_train.shape[-1], 10)
    dev = torch.device("cpu")
    cfg = lambda epochs: RunConfig(TrainConfig(epochs=epochs, lr=1e-3, lr_schedule="cosine"),  # noqa: E731
                                   batch_size=128, seed=seed)
    xtr, ytr, xte, yte = data.x_train, data.y_train, data.x_test, data.y_test
    add = lambda key, value: res.add(f"{ds} {key} | acc", seed, value, " %")  # noqa: E731

    teachers = []
    for (half, classes), name in zip(HALVES.items(), setup["teachers"]):
        keep = torch.isin(ytr, torch.tensor(classes))
        seed_all(seed)
        t = build_model(name, InputSpec(spec.in_channels, spec.image_size, 5))
        run(CrossEntropyObjective(t), xtr[keep], ytr[keep] - classes[0], cfg(setup["teacher_epochs"]), dev,
            desc=f"teacher {half}")
        mask = torch.isin(yte, torch.tensor(classes))
        add(f"half {half}: teacher", accuracy(t, xte[mask], yte[mask] - classes[0]))
        teachers.append(t)
    logits = [predict_logits(t, xtr, dev) for t in teachers]
    targets = {w: losses.merge_disjoint_probs(logits, list(HALVES.values()), 10, T, w)
               for w in ("confidence", "energy")}

    students: dict[str, torch.nn.Module] = {}
    for w in ("confidence", "energy"):
        seed_all(seed)
        students[w] = build_model(setup["student"], spec)
        run(SoftLabelObjective(students[w], 0, 0.0, T), xtr, targets[w], cfg(setup["epochs"]), dev, desc=w)

    feats = [embeddings(t, xtr) for t in teachers]
    pseudo = targets["energy"].argmax(-1)  # the merged teachers' classes: no label is used
    seed_all(seed)
    aligner = LatentAligner(tuple(f.shape[1] for f in feats), LATENT_DIM, hidden=256)
    run(CachedAlignerObjective(aligner, tuple(f.shape[1] for f in feats), MARGIN, 1.0), torch.cat(feats, 1), pseudo,
        cfg(ALIGNER_EPOCHS), dev, desc="aligner")
    codes = shared_codes(aligner, feats)
    seed_all(seed)
    s = build_model(setup["student"], spec)
    layer = default_embedding_layer(s)
    dim = embeddings(s, xtr[:2]).shape[1]
    seed_all(seed)
    s = build_model(setup["student"], spec)
    run(CachedLatentKDObjective(s, layer, dim, 10, LATENT_DIM, T, LATENT_WEIGHT), xtr,
        torch.cat([targets["energy"], codes], 1), cfg(setup["epochs"]), dev, desc="latent")
    students["energy + latent alignment"] = s
    seed_all(seed)
    sup = build_model(setup["student"], spec)
    run(CrossEntropyObjective(sup), xtr, ytr, cfg(setup["epochs"]), dev, desc="supervised")

    named = {f"merged student [{w}]": m for w, m in students.items()} | {"supervised student": sup}
    for half, classes in HALVES.items():
        mask = torch.isin(yte, torch.tensor(classes))
        for key, m in named.items():
            z = predict_logits(m, xte[mask], dev)
            add(f"half {half}: {key} (10-way)", 100.0 * float((z.argmax(-1) == yte[mask]).float().mean()))
            within = torch.tensor(classes)[z[:, classes].argmax(-1)]
            add(f"half {half}: {key} within half", 100.0 * float((within == yte[mask]).float().mean()))
    for key, m in named.items():
        add(f"all classes: {key}", accuracy(m, xte, yte))


def main() -> None:
    args = parse_args(__doc__, {"--datasets": (str, "mnist,cifar10", "comma-separated: mnist, cifar10")})
    datasets = args.datasets.split(",")
    config = {"datasets": datasets, "setups": {d: SETUPS[d] for d in datasets}, "halves": list(HALVES),
              "students": list(STUDENTS), "temperature": T, "latent_dim": LATENT_DIM, "margin": MARGIN,
              "latent_weight": LATENT_WEIGHT, "aligner_epochs": ALIGNER_EPOCHS, "lr": 1e-3,
              "lr_schedule": "cosine", "batch_size": 128}
    res = Results("disjoint", args, config)
    for seed in args.seeds:
        for ds in datasets:
            one_dataset(ds, seed, res)
        update_doc("disjoint")
    res.finish()


if __name__ == "__main__":
    main()
