"""The in-process runner: one scene after the other, in this process, with one model."""

from __future__ import annotations

from ..interfaces import Model
from .jobs import AfterHook, Job, SceneSettings, Tracker, process_scene


def run_here(jobs: list[Job], tracker: Tracker, model: Model, settings: SceneSettings,
             retries: int, after: AfterHook | None = None) -> None:
    """Refine ``jobs`` in order, retrying transient failures up to ``retries`` times."""
    for job in jobs:
        for attempt in range(1, retries + 2):
            tracker.running(job, attempt)
            res = process_scene(job.scene, job.output, model, job.settings(settings),
                                after=after)
            res.attempts = attempt
            if res.status == "done" or not res.retryable:
                break
        tracker.finish(job, res)
