"""Official SemEval-2022 Task 5 scores and answer files (paper section 4, "scoreA"/"scoreB").

Task A (and any one-label task) is scored with the mean of the positive-class
and the negative-class F1. Task B is, per label, that same two-class mean F1,
averaged with weights equal to each label's number of gold positives. This is
what the official MAMI scorer computes; it is *not* scikit-learn's multilabel
``average="weighted"`` (which weights the positive-class F1 only).

Edge cases, matching the official scorer where it defines them:

- A class that is absent from both gold and prediction has F1 0 (so an
  all-negative gold scored against all-negative predictions gets 0.5).
- A label with no gold positives has weight 0: it does not count in Task B,
  whatever is predicted for it.
- When no label has a gold positive the official scorer divides by zero; here
  Task B is then 0.0.

Answer files (what the official scorer reads): ``file_name<TAB>0|1`` for Task
A, ``file_name`` plus five 0/1 columns (misogynous, shaming, stereotype,
objectification, violence) for Task B. The gold file (``test_labels.txt``)
has the six-column layout. ``taskb`` scores the four sub-labels (columns 3-6).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .utils import MamikitError, atomic_write

MAMI_COLUMNS = ("misogynous", "shaming", "stereotype", "objectification", "violence")


def _binary(values, name: str) -> np.ndarray:
    arr = np.asarray(values)
    if arr.size and not np.isin(arr, (0, 1)).all():
        raise MamikitError(f"{name} must hold only 0 and 1, got {sorted(set(np.unique(arr).tolist()) - {0, 1})[:5]}")
    return arr.astype(np.int64)


def _two_class_f1(gold: np.ndarray, pred: np.ndarray) -> float:
    """Mean of positive- and negative-class F1; 0 for a class with no true, predicted or gold member."""
    scores = []
    for cls in (1, 0):
        tp = int(np.sum((pred == cls) & (gold == cls)))
        fp = int(np.sum((pred == cls) & (gold != cls)))
        fn = int(np.sum((pred != cls) & (gold == cls)))
        scores.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return float(np.mean(scores))


def score_a(gold, pred) -> float:
    """Task A score: mean of the positive-class and negative-class F1 (official MAMI scoreA).

    Args:
        gold, pred: (N,) 0/1.
    Returns:
        A float in [0, 1]; 0.0 for N = 0.
    """
    gold, pred = _binary(gold, "gold").reshape(-1), _binary(pred, "pred").reshape(-1)
    if gold.shape != pred.shape:
        raise MamikitError(f"gold has {gold.size} values, pred {pred.size}")
    if gold.size == 0:
        return 0.0
    return _two_class_f1(gold, pred)


def score_b(gold, pred) -> float:
    """Task B score: per-label score_a weighted by each label's gold positives (official scoreB).

    Args:
        gold, pred: (N, L) 0/1, one column per label.
    Returns:
        A float in [0, 1]; 0.0 when no label has a gold positive.
    """
    gold, pred = _binary(gold, "gold"), _binary(pred, "pred")
    if gold.ndim == 1:
        gold, pred = gold[:, None], pred.reshape(-1, 1)
    if gold.shape != pred.shape:
        raise MamikitError(f"gold has shape {gold.shape}, pred {pred.shape}")
    weights = gold.sum(axis=0)  # (L,) gold positives per label
    if gold.shape[0] == 0 or weights.sum() == 0:
        return 0.0
    per_label = np.array([_two_class_f1(gold[:, j], pred[:, j]) for j in range(gold.shape[1])])
    return float((per_label * weights).sum() / weights.sum())


# ----------------------------------------------------------------------------- answer files


def write_answer(path, ids, pred) -> None:
    """Write an official answer file atomically: (N,) -> 2 columns, (N, 5) -> 6 columns, tab-separated."""
    ids = [str(i) for i in ids]
    pred = _binary(pred, "pred")
    if pred.ndim == 1:
        pred = pred[:, None]
    if pred.ndim != 2 or pred.shape[0] != len(ids) or pred.shape[1] not in (1, len(MAMI_COLUMNS)):
        raise MamikitError(f"answer for {len(ids)} ids must be (N,) or (N, 5), got {pred.shape}")
    bad = [i for i in ids if not i or any(c in i for c in "\t\r\n")]
    if bad:
        raise MamikitError(f"file names may not be empty or hold tabs/newlines: {bad[:3]}")
    with atomic_write(path, "w") as fh:
        for meme, row in zip(ids, pred):
            fh.write(meme + "\t" + "\t".join(str(int(v)) for v in row) + "\n")


def _read_columns(path, allowed: tuple[int, ...]) -> tuple[list[str], np.ndarray, dict[str, int]]:
    """Read `file_name<TAB>0|1...` lines; every line must have the same allowed number of label columns."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise MamikitError(f"{path}: file not found") from None
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    ids: list[str] = []
    rows: list[list[int]] = []
    first: dict[str, int] = {}
    width = None
    for line_no, raw in enumerate(data.split(b"\n"), start=1):
        raw = raw.rstrip(b"\r")
        if not raw.strip():
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise MamikitError(f"{path}:{line_no}: not valid UTF-8") from None
        cells = [c.strip() for c in text.split("\t")]
        if len(cells) - 1 not in allowed:
                raise MamikitError(f"{path}:{line_no}: expected {' or '.join(str(a + 1) for a in allowed)} "
                                   f"tab-separated columns, found {len(cells)}")
        if width is None:
            width = len(cells) - 1
        elif len(cells) - 1 != width:
            raise MamikitError(f"{path}:{line_no}: {len(cells)} columns where earlier lines have {width + 1}")
        name = cells[0]
        if not name:
            raise MamikitError(f"{path}:{line_no}: empty file name")
        if name in first:
            raise MamikitError(f"{path}:{line_no}: duplicate file name {name!r} (first on line {first[name]})")
        values = []
        for cell in cells[1:]:
            if cell not in ("0", "1"):
                raise MamikitError(f"{path}:{line_no}: value {cell!r} is not 0 or 1")
            values.append(int(cell))
        first[name] = line_no
        ids.append(name)
        rows.append(values)
    if not ids:
        raise MamikitError(f"{path}: no rows")
    return ids, np.array(rows, dtype=np.int64), first


def read_answer(path) -> tuple[list[str], np.ndarray]:
    """Read an answer file -> (file names, (N, 1) or (N, 5) 0/1 array)."""
    return _read_columns(path, (1, len(MAMI_COLUMNS)))[:2]


def read_truth(path) -> tuple[list[str], np.ndarray]:
    """Read a gold file (test_labels.txt layout) -> (file names, (N, 5) or (N, 1) 0/1 array)."""
    return _read_columns(path, (len(MAMI_COLUMNS), 1))[:2]


def score_files(truth, answer) -> dict[str, float]:
    """Score an answer file against a gold file like the official scorer: {"taska": .., "taskb": ..}.

    Every gold file name must be answered exactly once and nothing else; a
    two-column answer (or gold) gets taskb 0.0.
    """
    gold_ids, gold, _ = _read_columns(truth, (len(MAMI_COLUMNS), 1))
    ans_ids, ans, line_of = _read_columns(answer, (1, len(MAMI_COLUMNS)))
    row_of = {name: i for i, name in enumerate(ans_ids)}
    gold_set = set(gold_ids)
    unknown = [n for n in ans_ids if n not in gold_set]
    if unknown:
        raise MamikitError(f"{answer}:{line_of[unknown[0]]}: file name {unknown[0]!r} is not in {truth} "
                           f"({len(unknown)} unknown)")
    missing = [n for n in gold_ids if n not in line_of]
    if missing:
        raise MamikitError(f"{answer}: no answer for {len(missing)} file names of {truth}, e.g. {missing[0]!r}")
    order = np.array([row_of[n] for n in gold_ids])
    ans = ans[order]
    result = {"taska": score_a(gold[:, 0], ans[:, 0]), "taskb": 0.0}
    if ans.shape[1] == len(MAMI_COLUMNS) and gold.shape[1] == len(MAMI_COLUMNS):
        result["taskb"] = score_b(gold[:, 1:], ans[:, 1:])
    return result
