"""Scoring without torch: the Scorer (stpm.runtime.scorer) on ONNX Runtime or OpenVINO sessions
(stpm.runtime.sessions), the backend and precision chosen for this machine (stpm.runtime.choice, from
what the CPU can run: stpm.runtime.cpu), inputs prepared once (stpm.runtime.images)."""

from stpm.runtime.scorer import Scorer, ScoreResult

__all__ = ["ScoreResult", "Scorer"]
