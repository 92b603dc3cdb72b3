"""The errors switchml raises; all derive from SwitchMLError."""

from __future__ import annotations


class SwitchMLError(RuntimeError):
    """Base class of every switchml failure."""


class ControllerTimeout(SwitchMLError, TimeoutError):
    """The controller did not answer in time."""


class ControllerError(SwitchMLError):
    """The controller answered with an error (bad request, failed job, pool exhausted)."""


class ControlAuthError(ControllerError):
    """The control channel's CurveZMQ handshake failed: this client and the controller do not
    share the cluster secret (or one of them has none)."""


class AllreduceTimeout(SwitchMLError, TimeoutError):
    """An allreduce made no progress in time: a peer or the switch is gone."""


class JobFailed(SwitchMLError):
    """The controller declared the job failed (a peer stopped sending heartbeats)."""


class WorkerClosed(SwitchMLError):
    """The worker was closed before the call completed."""


class ShapeMismatch(SwitchMLError, ValueError):
    """Ranks passed different element counts or dtypes to the same allreduce call.

    Attributes:
        own: this rank's (element count, dtype name).
        peers: every rank whose (element count, dtype name) differs from ``own``, by rank.
        in_step: whether the job's slots were left in step, so that the worker's next calls work;
            False when bringing them back failed too (the worker then refuses later calls).
    """

    def __init__(self, message: str, own: tuple[int, str] | None = None,
                 peers: dict[int, tuple[int, str]] | None = None, in_step: bool = True) -> None:
        super().__init__(message)
        self.own = own
        self.peers = peers or {}
        self.in_step = in_step


class SwitchUnreachable(SwitchMLError):
    """No packet came back from the switch's advertised address after registration."""


class ControllerGone(ControllerTimeout):
    """The connection to the controller closed: its process (with the software switch, the switch) ended."""


class RanksFailed(JobFailed):
    """The controller declared ranks of the job failed (they went silent); ``ranks`` names them."""

    def __init__(self, message: str, ranks: tuple[int, ...] = ()) -> None:
        super().__init__(message)
        self.ranks = tuple(ranks)


class LeafRoleUnsupported(SwitchMLError, ValueError):
    """A switch asked to be a leaf of a tree (docs/hierarchy.md) has no leaf role: the native data
    plane of the software switch, or a P4 pipeline without the upstream table."""
