"""The vocabulary of table 1, read from `mamikit/tasks.json`: datasets, their labels, their tasks.

One place answers every naming question the rest of mamikit asks: which
datasets exist and in which column order their labels come, which tasks each
dataset trains (section 3.4: several tasks per dataset, a label may be in more
than one), which dataset is the primary one (always trained, its test split
answered), which task is scored as the competition's Task A and which as Task B
(section 4), which datasets a multi-task experiment adds (section 5.1.4), and
which modalities and file layout each dataset has.

Adding a dataset or a task is an edit of `mamikit/tasks.json` (or of the file that
`MAMIKIT_TASKS` names); no code changes. The file looks like::

    {"primary": "MAMI",
     "official": {"A": "Task_A", "B": "Task_B"},
     "datasets": {"MAMI": {"labels": [...], "tasks": {"Task_A": [...], ...}},
                  "FBHM": {"labels": ["hateful"], "tasks": {"Hateful": ["hateful"]}},
                  "HSText": {"labels": ["hateful"], "tasks": {"HateSpeech": ["hateful"]},
                             "modalities": ["text"], "layout": "splits", "multi_task": false}}}

Each dataset may also declare (section 6's "more datasets"):

- ``modalities``: ``["image", "text"]`` (memes; the default), ``["text"]`` or
  ``["image"]``. Extraction runs only the backbones a dataset's modalities
  need, and the model reads a batch of it from the encoders it has.
- ``layout``: how its files are read (`mamikit.data`): ``"mami"`` (MAMI's
  official files; the primary's default), ``"hateful_memes"`` (the Hateful
  Memes JSON lines ``train.jsonl``, ``dev_seen.jsonl``, ...; the default of
  the others) or ``"splits"`` (``train``, ``dev``, ``test`` as ``.jsonl`` or
  ``.csv`` with ``id``, ``text`` and/or ``img``, one 0/1 column per label).
- ``multi_task``: whether multi-task experiments train on it (default true);
  a dataset with false joins an experiment only through its ``extra_datasets``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from .utils import MamikitError

# The tasks file shipped in the package (table 1); MAMIKIT_TASKS overrides it.
TASKS_PATH = Path(__file__).resolve().parent / "tasks.json"
MODALITIES = ("image", "text")  # a dataset's modalities, in this order; a meme has both
LAYOUTS = ("mami", "hateful_memes", "splits")  # the file layouts mamikit.data reads


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


def _spec(dataset: str, path=None) -> dict:
    cfg = tasks_config(path)
    if dataset not in cfg["datasets"]:
        raise MamikitError(f"unknown dataset {dataset!r}; {_where(path)} lists {', '.join(cfg['datasets'])}")
    return cfg["datasets"][dataset]


def dataset_modalities(dataset: str, path=None) -> tuple[str, ...]:
    """The modalities `dataset` holds, ("image", "text") for memes; tasks.json's ``modalities`` (absent: both)."""
    declared = _spec(dataset, path).get("modalities", list(MODALITIES))
    if (not isinstance(declared, list) or not declared or any(m not in MODALITIES for m in declared)
            or len(set(declared)) != len(declared)):
        raise MamikitError(f"{_where(path)}: dataset {dataset} has modalities {declared!r}; "
                           f"expected a list of distinct names from {list(MODALITIES)}")
    return tuple(m for m in MODALITIES if m in declared)


def dataset_layout(dataset: str, path=None) -> str:
    """How `dataset`'s files are read: tasks.json's ``layout``; by default "mami" for the declared primary (a file
    without ``primary``: a dataset named MAMI), "hateful_memes" for the others."""
    default = "mami" if dataset == tasks_config(path).get("primary", "MAMI") else "hateful_memes"
    layout = _spec(dataset, path).get("layout", default)
    if layout not in LAYOUTS:
        raise MamikitError(f"{_where(path)}: dataset {dataset} has layout {layout!r}; expected one of {LAYOUTS}")
    if layout != "splits" and dataset_modalities(dataset, path) != MODALITIES:
        raise MamikitError(f"{_where(path)}: dataset {dataset} holds only {dataset_modalities(dataset, path)[0]}; "
                           f"its layout must be 'splits' (the {layout} layout is of memes)")
    return layout


def multi_task_datasets(path=None) -> tuple[str, ...]:
    """The datasets multi-task experiments add to the primary one: those whose ``multi_task`` is not false."""
    cfg = tasks_config(path)
    primary = primary_dataset(path)
    out = []
    for name, spec in cfg["datasets"].items():
        flag = spec.get("multi_task", True)
        if not isinstance(flag, bool):
            raise MamikitError(f"{_where(path)}: dataset {name} has multi_task {flag!r}; expected true or false")
        if name != primary and flag:
            out.append(name)
    return tuple(out)


def training_datasets(multi_task: bool, path=None, extra=()) -> tuple[str, ...]:
    """Datasets an experiment learns from: the primary one, the multi-task ones when multi-task (3.4), then `extra`.

    Args:
        multi_task: add the datasets of :func:`multi_task_datasets`.
        path: a tasks file other than mamikit/tasks.json.
        extra: further datasets (``Experiment.extra_datasets``), checked to be in the tasks file and
            not already trained.
    """
    primary = primary_dataset(path)
    out = (primary,) + (multi_task_datasets(path) if multi_task else ())
    known = tasks_config(path)["datasets"]
    for name in extra:
        if name not in known:
            raise MamikitError(f"extra dataset {name!r} is not in {_where(path)}; it lists {', '.join(known)}")
        if name in out:
            why = "the primary dataset" if name == primary else "already trained by multi_task"
            raise MamikitError(f"extra dataset {name!r} is {why}; leave it out of extra_datasets")
        out += (name,)
    return out


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
