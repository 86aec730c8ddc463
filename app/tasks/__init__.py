"""One module per task (classify, ner, vqa), each defining `TASK`, an `app.tasks.base.Task`.

Adding a task means adding one module here: it is found by name, and the protocol front-ends and
the core serve it through the Task hooks.
"""
from __future__ import annotations

import importlib
import pkgutil

from app.tasks.base import Task


def _discover() -> dict[str, Task]:
    found: dict[str, Task] = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        if info.name == "base":
            continue
        task = importlib.import_module(f"{__name__}.{info.name}").TASK
        found[task.name] = task
    return found


TASKS: dict[str, Task] = _discover()  # name -> task, in name order


def get_task(name: str) -> Task:
    """The task a manifest names (KeyError for one this server has no module for)."""
    return TASKS[name]


__all__ = ["TASKS", "Task", "get_task"]
