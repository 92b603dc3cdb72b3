"""switchml: in-network gradient aggregation (SwitchML) for PyTorch.

    from switchml import Worker
    with Worker(controller="tcp://127.0.0.1:48865", job="demo", rank=r, world_size=n) as w:
        y = w.allreduce(x)

See DESIGN.md for the wire format, the switch algorithm and the control plane.
"""

from switchml.errors import (
    AllreduceTimeout,
    ControllerError,
    ControllerTimeout,
    JobFailed,
    ShapeMismatch,
    SwitchMLError,
    WorkerClosed,
)
from switchml.worker import JobInfo, Worker, WorkerOptions, WorkerStats

__version__ = "0.1.0"
__all__ = [
    "AllreduceTimeout", "ControllerError", "ControllerTimeout", "JobFailed", "JobInfo", "ShapeMismatch", "SwitchMLError",
    "Worker", "WorkerClosed", "WorkerOptions", "WorkerStats", "__version__",
]
