"""What a job's figures mean, defined once for every view (jobs list, job page, API, `skinscan submit`, logs).

- images: the files accepted as images of the job (stored, to be scored);
- scored: images with a prediction;
- not scored: images that were accepted but could not be scored (a truncated or undecodable file, a job that
  failed to start);
- refused: files refused at upload (not an image, too large...): never stored, not images of the job;
- cancelled: images a cancellation left unscored; pending: images still waiting.
images = scored + not scored + cancelled + pending.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol


class CountedJob(Protocol):
    """A job's stored counters: total and failed include the refused files' rows."""

    status: str
    total: int
    scored: int
    failed: int
    refused: int


@dataclass(frozen=True)
class JobCounts:
    """A job's figures, as every view shows them."""

    images: int
    scored: int
    not_scored: int
    refused: int
    cancelled: int
    pending: int

    @property
    def finished(self) -> int:
        """Images whose scoring is over (scored or not scored)."""
        return self.scored + self.not_scored

    def as_api(self) -> dict[str, int]:
        """The API's `counts`: total (= images), scored, failed (= not scored), refused; cancelled when any."""
        out = {"total": self.images, "scored": self.scored, "failed": self.not_scored, "refused": self.refused}
        if self.cancelled:
            out["cancelled"] = self.cancelled
        return out

    @classmethod
    def from_api(cls, counts: dict[str, Any], status: str) -> JobCounts:
        """Read the API's `counts` back (the command line's view of a job)."""
        images, scored, not_scored = int(counts["total"]), int(counts["scored"]), int(counts["failed"])
        rest = max(0, images - scored - not_scored)
        return cls(images, scored, not_scored, int(counts.get("refused", 0)),
                   rest if status == "cancelled" else 0, 0 if status == "cancelled" else rest)


def job_counts(job: CountedJob) -> JobCounts:
    """The figures of a job from its stored counters (one indexed row: no per-image work)."""
    refused = job.refused or 0
    images, not_scored = max(0, job.total - refused), max(0, job.failed - refused)
    rest = max(0, images - job.scored - not_scored)
    cancelled = rest if job.status == "cancelled" else 0
    return JobCounts(images, job.scored, not_scored, refused, cancelled, rest - cancelled)
