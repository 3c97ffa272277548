"""STPM: unsupervised visual anomaly detection (PatchCore by default, STPM student-teacher matching).

The public Python API (stpm.api; README "Python"):

    version = stpm.train(data, name="bottle")   # -> Version (torch)
    scorer = stpm.load(version)                  # -> stpm.runtime.Scorer (ONNX Runtime / OpenVINO, no torch)
    results = scorer.score(["photo.png"])        # -> [ScoreResult]

`import stpm` imports no torch: the scoring path (stpm.bundle, stpm.imaging, stpm.runtime) is torch-free,
and `train` imports the training code when it is called.
"""

from stpm.api import Version, load, train

__version__ = "0.1.0"
__all__ = ["Version", "load", "train", "__version__"]
