"""STPM: Student-Teacher Feature Pyramid Matching for unsupervised anomaly detection.

The public Python API (stpm.api; README "Python"):

    version = stpm.train(data, name="bottle", epochs=20)   # -> Version (torch)
    scorer = stpm.load(version)                             # -> stpm.runtime.Scorer (ONNX Runtime, no torch)
    results = scorer.score(["photo.png"])                   # -> [ScoreResult]

`import stpm` imports no torch: `stpm.runtime` and `stpm.imageio` are torch-free (the scoring service
uses only them), and `train` imports the torch library when it is called.
"""

from stpm.api import Version, load, train

__version__ = "0.1.0"
__all__ = ["Version", "load", "train", "__version__"]
