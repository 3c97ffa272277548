"""Distillation methods: objectives (one loss per batch) and multi-stage recipes."""
from stpm.distill.methods.feature_kd import (AttentionFusion, AttentionTransferObjective, FitNetObjective,
                                            FSPObjective, HintRegressor, NSTObjective, ReviewKDObjective,
                                            VIDObjective, VIDRegressor)
from stpm.distill.methods.latent import (AlignerObjective, CachedAlignerObjective, CachedLatentKDObjective,
                                        LatentAligner, LatentKDObjective, aligner_loss, shared_codes)
from stpm.distill.methods.mutual import MutualObjective
from stpm.distill.methods.offline import (CachedKDObjective, CrossEntropyObjective, DisjointMergeKD, DKDObjective,
                                          KDObjective, LogitMatchingObjective, MultiTeacherKD, SoftLabelObjective,
                                          frozen, noise_inputs, pack_labels_and_logits)
from stpm.distill.methods.pipelines import (NoisyStudentConfig, RunConfig, eskd_teacher, noisy_student,
                                            pseudo_labels, run, takd_chain, train_classifier)
from stpm.distill.methods.relation_kd import (CCObjective, CRDObjective, Embed, PKTObjective, RKDObjective,
                                             SPObjective)

__all__ = [
    "AlignerObjective", "AttentionFusion", "AttentionTransferObjective", "CCObjective", "CRDObjective",
    "CachedAlignerObjective", "CachedKDObjective", "CachedLatentKDObjective", "CrossEntropyObjective",
    "DKDObjective", "DisjointMergeKD", "Embed", "FSPObjective", "FitNetObjective", "HintRegressor",
    "KDObjective", "LatentAligner", "LatentKDObjective", "LogitMatchingObjective", "MultiTeacherKD",
    "MutualObjective", "NSTObjective", "NoisyStudentConfig", "PKTObjective", "RKDObjective",
    "ReviewKDObjective", "RunConfig", "SPObjective", "SoftLabelObjective", "VIDObjective", "VIDRegressor",
    "aligner_loss", "eskd_teacher", "frozen", "noise_inputs", "noisy_student", "pack_labels_and_logits",
    "pseudo_labels", "run", "shared_codes", "takd_chain", "train_classifier",
]
