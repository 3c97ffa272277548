"""The names that modules outside stpm/runtime imported from the former backends module (stpm/cli.py,
stpm/distill/export.py, app/routes/models.py). New code imports from where they live: stpm.runtime.cpu
(CPU facts), stpm.runtime.sessions (sessions), stpm.runtime.choice (backend and precision choice)."""

from stpm.runtime.choice import bundle_precisions
from stpm.runtime.sessions import BACKENDS, PRECISIONS, ort_session

__all__ = ["BACKENDS", "PRECISIONS", "bundle_precisions", "ort_session"]
