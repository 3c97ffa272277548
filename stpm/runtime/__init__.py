"""Scoring without torch: the Scorer (stpm.runtime.scorer) on ONNX Runtime or OpenVINO sessions
(stpm.runtime.backends)."""

from stpm.runtime.scorer import Scorer, ScoreResult

__all__ = ["ScoreResult", "Scorer"]
