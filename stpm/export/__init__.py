"""ONNX export of a bundle (stpm.export.onnx), its parity checks and lower precisions (torch)."""

from stpm.export.onnx import *  # noqa: F401,F403
from stpm.export.onnx import __all__  # noqa: F401
