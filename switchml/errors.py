"""The errors switchml raises; all derive from SwitchMLError."""

from __future__ import annotations


class SwitchMLError(RuntimeError):
    """Base class of every switchml failure."""


class ControllerTimeout(SwitchMLError, TimeoutError):
    """The controller did not answer in time."""


class ControllerError(SwitchMLError):
    """The controller answered with an error (bad request, failed job, pool exhausted)."""


class AllreduceTimeout(SwitchMLError, TimeoutError):
    """An allreduce made no progress in time: a peer or the switch is gone."""


class JobFailed(SwitchMLError):
    """The controller declared the job failed (a peer stopped sending heartbeats)."""


class WorkerClosed(SwitchMLError):
    """The worker was closed before the call completed."""
