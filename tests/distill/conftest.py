import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="session")
def digits_batch():
    """A tiny real batch: 64 scikit-learn digits (8x8, 1 channel) and their labels."""
    from stpm.distill.data import digits_split

    torch.set_num_threads(1)
    s = digits_split(1400, split_seed=0)
    return s.x_train[:64], s.y_train[:64]


@pytest.fixture(scope="session")
def mnist_dir() -> Path:
    from tests.conftest import SHARED_DATA

    raw = SHARED_DATA / "mnist_full" / "MNIST" / "raw"
    if not (raw / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"full MNIST not found at {raw} (set STPM_SHARED_DATA to the shared data folder)")
    return raw


@pytest.fixture(scope="session")
def cifar_dir() -> Path:
    from tests.conftest import SHARED_DATA

    root = SHARED_DATA / "cifar10_jpeg"
    if not (root / "test.tar.gz").is_file():
        pytest.skip(f"CIFAR-10 JPEG tarballs not found at {root} (set STPM_SHARED_DATA to the shared data folder)")
    return root
