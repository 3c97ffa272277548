"""The job store's errors (app.jobs.store raises them; the API maps them to 503 and 429)."""

from __future__ import annotations


class StoreUnavailable(RuntimeError):
    """The job database cannot be reached right now (stopped, restarting, cut off); the message says why."""


class QueueFullError(RuntimeError):
    """A job refused because `max_queued` jobs are already waiting."""

    def __init__(self, queued: int, limit: int):
        super().__init__(f"{queued} training jobs are already waiting; at most {limit}")
        self.queued, self.limit = queued, limit
