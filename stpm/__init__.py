"""STPM: Student-Teacher Feature Pyramid Matching for unsupervised anomaly detection.

`stpm.runtime` and `stpm.imageio` are torch-free (the scoring service uses only them);
everything else is the torch library.
"""

__version__ = "0.1.0"
