"""The trainer's typed configuration: what ``switchml-train``'s flags say, fixed before launch.

``switchml-train`` parses its flags once into a ``TrainConfig``; launchers that learn
something (the switch's endpoint, torchrun's world size) make a new one with ``replace``
rather than changing the flags under the ranks. The defaults live in the parser
(``trainer.cli``); a task's own flags travel in ``options`` and read as attributes
(``config.width``), so that tasks read a config as they read flags.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class TrainConfig:
    """One training run: the run, the communication, and the task's own options."""

    task: str
    launcher: str
    workers: int
    steps: int | None
    epochs: int | None
    batch_size: int | None
    lr: float | None
    accumulate: int
    seed: int
    out: str
    resume: bool
    log_every: int
    checkpoint_every: int
    device: str
    threads: int
    no_progress: bool
    find_unused_parameters: bool
    bucket_cap_mb: float
    comm: str
    controller: str | None
    job: str
    k: int | None
    switch_timeout: float
    no_fallback: bool
    retry_after_steps: int | None
    drop_probability: float
    ray_address: str | None
    secret_file: str | None = None  #: the control channel's cluster secret (docs/security.md)
    options: dict[str, Any] = field(default_factory=dict)  #: the task's own flags, by name

    @classmethod
    def from_namespace(cls, args: argparse.Namespace) -> TrainConfig:
        """The config of parsed ``switchml-train`` flags; ``out`` defaults to ``runs/TASK``."""
        values = dict(vars(args))
        common = {f.name: values.pop(f.name) for f in dataclasses.fields(cls) if f.name in values}
        common["out"] = common.get("out") or f"runs/{common['task']}"
        return cls(**common, options=values)

    def replace(self, **changes: Any) -> TrainConfig:
        """A copy with ``changes`` (a run's fields; a task's options go through ``options``)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain values (for Ray's ``train_loop_config``); ``from_dict`` makes it again."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        return cls(**values)

    def __getattr__(self, name: str) -> Any:
        # only for names that are not fields: a task's options (unpickling asks before they exist)
        if name.startswith("__") or name == "options":
            raise AttributeError(name)
        try:
            return self.options[name]
        except KeyError:
            raise AttributeError(f"{type(self).__name__} has no field or task option {name!r}") from None
