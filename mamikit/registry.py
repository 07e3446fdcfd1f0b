"""The vocabulary of table 1, read from `mamikit/tasks.json`: datasets, their labels, their tasks.

One place answers every naming question the rest of mamikit asks: which
datasets exist and in which column order their labels come, which tasks each
dataset trains (section 3.4: several tasks per dataset, a label may be in more
than one), which dataset is the primary one (always trained, its test split
answered), which task is scored as the competition's Task A and which as Task B
(section 4), and which datasets a multi-task experiment adds (section 5.1.4).

Adding a dataset or a task is an edit of `mamikit/tasks.json` (or of the file that
`MAMIKIT_TASKS` names); no code changes. The file looks like::

    {"primary": "MAMI",
     "official": {"A": "Task_A", "B": "Task_B"},
     "datasets": {"MAMI": {"labels": [...], "tasks": {"Task_A": [...], ...}},
                  "FBHM": {"labels": ["hateful"], "tasks": {"Hateful": ["hateful"]}}}}

Datasets other than the primary one are read in the Hateful Memes JSONL layout
(`train.jsonl`, `dev_seen.jsonl`, ... with `id`, `img`, `label`, `text`) and
are the extra data of multi-task experiments.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from .utils import MamikitError

# The tasks file shipped in the package (table 1); MAMIKIT_TASKS overrides it.
TASKS_PATH = Path(__file__).resolve().parent / "tasks.json"


@dataclass(frozen=True)
class Task:
    """One task of table 1: a name, the dataset it belongs to and its labels."""

    name: str  # e.g. "Task_A"
    dataset: str  # e.g. "MAMI"
    labels: tuple[str, ...]  # the labels the task predicts, in dataset order


def _where(path) -> str:
    return str(path or os.environ.get("MAMIKIT_TASKS") or TASKS_PATH)


def tasks_config(path=None) -> dict:
    """The parsed tasks file: $MAMIKIT_TASKS, else the package's tasks.json."""
    path = path or os.environ.get("MAMIKIT_TASKS") or TASKS_PATH
    try:
        with open(path, encoding="utf-8-sig") as fh:
            cfg = json.load(fh)
    except FileNotFoundError:
        raise MamikitError(f"{path}: tasks file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise MamikitError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(cfg, dict) or not isinstance(cfg.get("datasets"), dict) or not cfg["datasets"]:
        raise MamikitError(f"{path}: expected an object with a non-empty 'datasets' object")
    return cfg


def load_tasks(path=None) -> dict[str, tuple[Task, ...]]:
    """Read mamikit/tasks.json: dataset name -> its tasks, in file order.

    Args:
        path: a tasks file; default $MAMIKIT_TASKS, else the repository's mamikit/tasks.json.
    Returns:
        {dataset: (Task, ...)}.
    """
    cfg = tasks_config(path)
    out: dict[str, tuple[Task, ...]] = {}
    for dataset, spec in cfg["datasets"].items():
        labels = list(spec.get("labels") or [])
        if not labels or len(set(labels)) != len(labels):
            raise MamikitError(f"{_where(path)}: dataset {dataset} needs a list of distinct labels")
        tasks = []
        for name, task_labels in (spec.get("tasks") or {}).items():
            unknown = [lab for lab in task_labels if lab not in labels]
            if unknown or not task_labels:
                raise MamikitError(f"{_where(path)}: task {name} of {dataset} has unknown or no labels {unknown}")
            # keep the dataset's label order whatever order the task lists them in
            tasks.append(Task(name, dataset, tuple(lab for lab in labels if lab in task_labels)))
        out[dataset] = tuple(tasks)
    return out


def dataset_labels(dataset: str, tasks=None) -> tuple[str, ...]:
    """Labels of `dataset` in file order (the order of its CSV/JSONL columns).

    `tasks` may be the dict of :func:`load_tasks` (labels in first-seen order
    over the dataset's tasks) or a tasks file; default mamikit/tasks.json.
    """
    if isinstance(tasks, dict):
        if dataset not in tasks:
            raise MamikitError(f"unknown dataset {dataset!r}; known: {', '.join(tasks)}")
        seen: list[str] = []
        for task in tasks[dataset]:
            seen += [lab for lab in task.labels if lab not in seen]
        return tuple(seen)
    cfg = tasks_config(tasks)
    if dataset not in cfg["datasets"]:
        raise MamikitError(f"unknown dataset {dataset!r}; known: {', '.join(cfg['datasets'])}")
    return tuple(cfg["datasets"][dataset]["labels"])


def primary_dataset(path=None) -> str:
    """The dataset every experiment trains on and whose test split is answered (MAMI)."""
    cfg = tasks_config(path)
    name = cfg.get("primary", next(iter(cfg["datasets"])))
    if name not in cfg["datasets"]:
        raise MamikitError(f"{_where(path)}: primary dataset {name!r} is not among its datasets")
    return name


def training_datasets(multi_task: bool, path=None) -> tuple[str, ...]:
    """Datasets an experiment learns from: the primary one, plus every other one when multi-task (3.4)."""
    primary = primary_dataset(path)
    if not multi_task:
        return (primary,)
    return (primary,) + tuple(d for d in tasks_config(path)["datasets"] if d != primary)


def official_tasks(path=None) -> dict[str, Task]:
    """The tasks scored as the competition's sub-tasks: {"A": Task, "B": Task} (those declared).

    Task A answers one label (a 2-column answer file); Task B's answer file
    holds Task A's label then Task B's labels (6 columns for MAMI).
    """
    cfg = tasks_config(path)
    primary = primary_dataset(path)
    by_name = {t.name: t for t in load_tasks(path)[primary]}
    out = {}
    for key, name in (cfg.get("official") or {}).items():
        if key not in ("A", "B"):
            raise MamikitError(f"{_where(path)}: official sub-tasks are 'A' and 'B', not {key!r}")
        if name not in by_name:
            raise MamikitError(f"{_where(path)}: official task {key} is {name!r}, which {primary} does not define")
        out[key] = by_name[name]
    if "A" in out and len(out["A"].labels) != 1:
        raise MamikitError(f"{_where(path)}: official task A ({out['A'].name}) must have exactly one label")
    if "B" in out and "A" not in out:
        raise MamikitError(f"{_where(path)}: official task B needs an official task A (its first answer column)")
    return out


def official_task_names(path=None) -> tuple[str, ...]:
    """Names of the official tasks, A first ("Task_A", "Task_B")."""
    return tuple(t.name for _, t in sorted(official_tasks(path).items()))
