"""The competition submission (section 4): one zip per official sub-task, from the run the dev split picks.

SemEval-2022 Task 5 took one zip per sub-task, each holding a single
`answer.txt`: Task A's with two columns (file name, misogynous), Task B's
with six (file name, misogynous and the four sub-labels). Every run already
writes both files from its best-dev checkpoints (`answer/best/taskA|taskB/`,
mamikit.runs); :func:`make_submission` chooses, per sub-task, the run with the
highest dev score of that task and zips its file. The test split never
chooses: its scores are what the tables report, and a choice made on them
would overstate the result.
"""

from __future__ import annotations

import dataclasses
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .metrics import read_answer, score_files
from .registry import official_tasks
from .utils import MamikitError, atomic_write, get_logger, write_json

log = get_logger(__name__)

ANSWER_NAME = "answer.txt"  # the one member of a submission zip, as the competition read it
COLUMNS = {"A": 1, "B": 5}  # label columns of each sub-task's answer file


@dataclass(frozen=True)
class SubmissionPick:
    """What one sub-task's zip holds and why that run."""

    subtask: str  # "A" or "B"
    task: str  # the task whose dev score chose the run (mamikit/tasks.json `official`)
    run: str  # the run folder relative to the runs root
    run_dir: str  # the run folder, absolute
    dev_score: float  # the run's best dev score of `task` (its best checkpoint's)
    zip_path: str  # the zip written
    test_score: float | None = None  # the zip's official score when a gold file was given; never used to choose


def _candidates(logs, task: str, subtask: str):
    """(dev score, run, run_dir, answer file) of each run with a best-dev answer file for `subtask`."""
    from .analysis import run_max_scores

    maxes = run_max_scores(logs)
    dev = maxes[(maxes["split"] == "dev") & (maxes["task"] == task)]
    found = []
    for row in dev.itertuples(index=False):
        answer = Path(row.run_dir) / "answer" / "best" / f"task{subtask}" / ANSWER_NAME
        if answer.is_file():
            found.append((float(row.max), row.run, row.run_dir, answer))
        else:
            log.info("%s: no %s (has it evaluated on the test split?); not a candidate for Task %s", row.run, answer,
                     subtask)
    return found


def _write_zip(answer: Path, path: Path, columns: int) -> None:
    """A zip holding `answer` as `answer.txt`, after checking its number of label columns."""
    _, values = read_answer(answer)
    if values.shape[1] != columns:
        raise MamikitError(f"{answer}: {values.shape[1] + 1} columns, a Task {'A' if columns == 1 else 'B'} answer "
                           f"has {columns + 1}")
    with atomic_write(path, "wb") as fh:
        with zipfile.ZipFile(fh, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            zf.writestr(ANSWER_NAME, answer.read_bytes())


def make_submission(runs_root, out_dir, select: str = "dev", truth=None) -> dict[str, SubmissionPick]:
    """Write the Task A and Task B submission zips from the runs with the best dev scores.

    Args:
        runs_root: a folder of run directories (any depth), e.g. `runs/`.
        out_dir: where `taskA.zip`, `taskB.zip` and `submission.json` (the picks) go.
        select: the split that chooses the run; only "dev" (the test split must not choose).
        truth: a gold file (test_labels.txt layout); when given, each zip's official score is added.
    Returns:
        {"A": SubmissionPick, "B": SubmissionPick} for the official sub-tasks declared in mamikit/tasks.json.
    """
    from .analysis import read_logs

    if select != "dev":
        raise MamikitError(f"select={select!r}: the submission is chosen by the dev split; the test scores are "
                           "the result being reported and must not choose the run")
    logs = read_logs(runs_root)
    if logs.empty:
        raise MamikitError(f"{runs_root}: no run logs (log.jsonl) found")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    picks = {}
    for subtask, task in sorted(official_tasks().items()):
        found = _candidates(logs, task.name, subtask)
        if not found:
            raise MamikitError(f"{runs_root}: no run has a dev score of {task.name} and a Task {subtask} answer file")
        # ties: the last run name, for a fixed choice
        dev, run, run_dir, answer = max(found, key=lambda c: (c[0], c[1]))
        path = out / f"task{subtask}.zip"
        _write_zip(answer, path, COLUMNS[subtask])
        test = None
        if truth is not None:
            scores = score_files(truth, answer)
            test = scores["taska" if subtask == "A" else "taskb"]
        picks[subtask] = SubmissionPick(subtask, task.name, run, run_dir, dev, str(path), test)
        log.info("Task %s: %s (dev %s %.4f) -> %s", subtask, run, task.name, dev, path)
    write_json(out / "submission.json", {k: dataclasses.asdict(v) for k, v in picks.items()})
    return picks


def score_submission(truth, path) -> dict[str, float]:
    """Score a submission zip as the official scorer does: it must hold only answer.txt; {"taska", "taskb"}."""
    import tempfile

    path = Path(path)
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
        if names != [ANSWER_NAME]:
            raise MamikitError(f"{path}: a submission zip holds only {ANSWER_NAME}, "
                               f"this one holds {', '.join(names) or 'nothing'}")
        data = zf.read(ANSWER_NAME)
    with tempfile.TemporaryDirectory() as tmp:
        answer = Path(tmp) / ANSWER_NAME
        answer.write_bytes(data)
        try:
            return score_files(truth, answer)
        except MamikitError as exc:
            raise MamikitError(f"{path}: {str(exc).replace(str(answer), ANSWER_NAME)}") from None


def score_answers(runs_root, truth):
    """The official scores of every answer file under `runs_root` (each run's best/last, Task A/B files) as a
    DataFrame."""
    import pandas as pd

    root, rows = Path(runs_root), []
    for answer in sorted(root.glob("**/answer/*/task*/" + ANSWER_NAME)):
        run = answer.parents[3]
        rows.append({"run": run.relative_to(root).as_posix(), "checkpoint": answer.parents[1].name,
                     "file": answer.parent.name, **score_files(truth, answer)})
    return pd.DataFrame(rows, columns=["run", "checkpoint", "file", "taska", "taskb"])
