"""STPM: Student-Teacher Feature Pyramid Matching for unsupervised anomaly detection.

The public Python API (stpm.api; README "Python"):

    version = stpm.train(data, name="bottle", epochs=20)   # -> Version (torch)
    scorer = stpm.load(version)                             # -> stpm.runtime.Scorer (ONNX Runtime, no torch)
    results = scorer.score(["photo.png"])                   # -> [ScoreResult]

`import stpm` imports no torch: `stpm.runtime` and `stpm.imageio` are torch-free (the scoring service
uses only them), and `train` imports the torch library when it is called.
"""

import sys
import types

from stpm.api import Version, load, train

__version__ = "0.1.0"
__all__ = ["Version", "load", "train", "__version__"]


class _Package(types.ModuleType):
    """`stpm.train` is the public function, and stpm/train.py is the training loop's module: importing
    that module makes the import system set `stpm.train` to it, which would replace the function (after
    the first `stpm.train(...)` call, or any `from stpm.train import ...`). The function stays; the
    module is reached as usual through `from stpm.train import fit` / sys.modules["stpm.train"]."""

    def __setattr__(self, name: str, value: object) -> None:
        if name == "train" and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
