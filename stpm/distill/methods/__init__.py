"""Distillation methods: objectives (one loss per batch) and multi-stage recipes."""
from stpm.distill.methods.feature_kd import AttentionTransferObjective, FitNetObjective, FSPObjective, HintRegressor
from stpm.distill.methods.latent import AlignerObjective, LatentAligner, LatentKDObjective, aligner_loss
from stpm.distill.methods.mutual import MutualObjective
from stpm.distill.methods.offline import (CachedKDObjective, CrossEntropyObjective, pack_labels_and_logits, DisjointMergeKD, DKDObjective, KDObjective,
                                          LogitMatchingObjective, MultiTeacherKD, SoftLabelObjective, frozen,
                                          noise_inputs)
from stpm.distill.methods.pipelines import (NoisyStudentConfig, RunConfig, eskd_teacher, noisy_student,
                                            pseudo_labels, run, takd_chain, train_classifier)

__all__ = [
    "AlignerObjective", "CachedKDObjective", "pack_labels_and_logits", "AttentionTransferObjective", "CrossEntropyObjective", "DKDObjective", "DisjointMergeKD",
    "FSPObjective", "FitNetObjective", "HintRegressor", "KDObjective", "LatentAligner", "LatentKDObjective",
    "LogitMatchingObjective", "MultiTeacherKD", "MutualObjective", "NoisyStudentConfig", "RunConfig",
    "SoftLabelObjective", "aligner_loss", "eskd_teacher", "frozen", "noise_inputs", "noisy_student",
    "pseudo_labels", "run", "takd_chain", "train_classifier",
]
