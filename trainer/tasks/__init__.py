"""The trainer's tasks, by name. Modules load lazily so that one task's dependencies
(open_clip, say) are not needed to train another."""

from __future__ import annotations

import importlib

from trainer.tasks.base import Stage, StageContext, Task

#: task name -> "module:class"
TASKS: dict[str, str] = {
    "digits": "trainer.tasks.digits:DigitsTask",
    "attribution": "trainer.tasks.attribution:AttributionTask",
    "clip": "trainer.tasks.clip:ClipTask",
    "shapes_resnet": "trainer.tasks.convnet:ShapesResNetTask",
}


def available_tasks() -> list[str]:
    """Names of the tasks whose module is present."""
    names = []
    for name, target in TASKS.items():
        if importlib.util.find_spec(target.split(":")[0]) is not None:
            names.append(name)
    return names


def get_task(name: str) -> type[Task]:
    """The task class called ``name``; a clear error for an unknown one."""
    if name not in TASKS:
        raise KeyError(f"unknown task {name!r}; available: {', '.join(available_tasks())}")
    module, cls = TASKS[name].split(":")
    return getattr(importlib.import_module(module), cls)


__all__ = ["TASKS", "Stage", "StageContext", "Task", "available_tasks", "get_task"]
