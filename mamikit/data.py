"""Readers, cleaning and splits for MAMI and FBHM (paper section 4, table 1).

The paper trains on the MAMI training set and Facebook's hateful memes (FBHM),
each split 80/20 into train and dev with stratified sampling, and tests on the
data MAMI released after the evaluation period. This module reads both
datasets in their official layouts, reports every row it cannot use, and
returns one table per split.

Layouts (below a data folder ``root``)::

    MAMI/TRAINING/training.csv   tab-separated: file_name, misogynous, shaming,
                                 stereotype, objectification, violence,
                                 Text Transcription; images beside it
    MAMI/test/Test.csv           file_name, Text Transcription; images beside it
    MAMI/test_labels.txt         no header: file name and the five labels
    FBHM/{train,dev_seen,dev_unseen,test_seen,test_unseen}.jsonl
                                 keys id, img, label, text; img relative to FBHM/
    NAME/{train,dev,test}.jsonl or .csv
                                 the "splits" layout (e.g. the text-only HSText):
                                 id, then text and/or img as the dataset's
                                 modalities ask, one 0/1 column per label

Decisions:

- Splits: per dataset, 80/20 stratified on the full label combination and
  seeded (:func:`stratified_split`). Combinations too rare to stratify are
  merged, smallest first, until every stratum has at least two rows.
  ``authors_split`` instead splits as the authors' code did
  (:func:`authors_split`: seed 3704, in the order of the training file).
- MAMI test = ``Test.csv`` joined with ``test_labels.txt`` (labels -1 where a
  test meme has no gold row), kept whole so that scores match the official
  scorer's.
- FBHM train/dev = the 80/20 split of ``train.jsonl``. FBHM test = the
  labelled held-out files: ``dev_seen`` plus the rows of ``dev_unseen``,
  ``test_seen`` and ``test_unseen`` that carry a label, deduplicated by id
  (first file in that order wins). Unlabelled held-out rows are left out of
  every split and counted in ``DatasetSplits.notes``.
- MAMI training rows whose sub-labels are set while ``misogynous`` is 0 are
  inconsistent; they are dropped and counted (``dropped_inconsistent``).
- Any other dataset listed in mamikit/tasks.json is read in its declared
  ``layout`` (`registry.dataset_layout`): like FBHM by default (JSON lines
  whose label keys are the label names, or ``label`` for a one-label
  dataset), or in the "splits" layout: ``train``, ``dev`` and ``test`` given
  as files (dev absent: the 80/20 split of train; test absent: empty), each
  ``.jsonl`` or ``.csv`` with a header. Its columns are ``id``, ``text`` for a
  dataset with text, ``img`` (relative to its folder) for one with images,
  and the labels (``label`` for a one-label dataset); test labels may be
  missing (-1). A dataset without images has ``image`` None in its tables.

Every unusable row (unreadable label, duplicate file name, missing or
unreadable image, text that is not UTF-8, a file name that escapes the data
folder) becomes a :class:`Problem`; rows are never dropped silently.

Longer than mamikit's usual module (about 650 lines): the two official layouts share the
row-level validation (each bad row reported once, with its file and line), which is most
of this file; the vocabulary itself lives in registry.py.
"""

from __future__ import annotations

import csv
import json
import math
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

# the readers' vocabulary, re-exported (hence the noqa)
from .registry import (Task, dataset_labels, dataset_layout, dataset_modalities, load_tasks,  # noqa: F401
                       primary_dataset, tasks_config)
from .utils import MamikitError, get_logger, inside, open_image_rgb

log = get_logger(__name__)

FBHM_FILES = ("train", "dev_seen", "dev_unseen", "test_seen", "test_unseen")
SPLITS = ("train", "dev", "test")
UNKNOWN = -1  # label value of a meme without gold label (e.g. unlabelled test rows)


# ----------------------------------------------------------------------------- problems and results


@dataclass
class Problem:
    """A row (or file) that could not be used, with the reason."""

    dataset: str  # "MAMI", "FBHM", ...
    file: str  # the meme's file name / id, or the data file when the whole file is at fault
    reason: str  # what is wrong, ending with where: "(training.csv line 12)"
    line: int | None = None  # 1-based line in the data file, header included

    def __str__(self) -> str:
        return f"{self.dataset} {self.file} {self.reason}"


@dataclass
class DatasetSplits:
    """One dataset's train/dev/test tables plus what was left out and why."""

    name: str
    labels: tuple[str, ...]
    splits: dict[str, pd.DataFrame]  # "train", "dev", "test" -> id, image, text, one int column per label
    problems: list[Problem]
    dropped_inconsistent: int  # MAMI rows with sub-labels set while misogynous is 0
    notes: list[str] = field(default_factory=list)  # decisions worth telling the user (counts)

    def counts(self) -> dict[str, int]:
        """Rows per split."""
        return {k: len(v) for k, v in self.splits.items()}


class _Rows:
    """Collects valid rows and problems of one dataset while reading."""

    def __init__(self, dataset: str, labels: tuple[str, ...]):
        self.dataset, self.labels = dataset, labels
        self.rows: list[dict] = []
        self.problems: list[Problem] = []

    def problem(self, file: str, reason: str, where: str, line: int | None) -> None:
        loc = f"{where} line {line}" if line else where
        self.problems.append(Problem(self.dataset, file or "?", f"{reason} ({loc})", line))


def _empty_frame(labels) -> pd.DataFrame:
    cols = {"id": pd.Series([], dtype=object), "image": pd.Series([], dtype=object),
            "text": pd.Series([], dtype=object)}
    cols.update({lab: pd.Series([], dtype="int64") for lab in labels})
    return pd.DataFrame(cols)


def _frame(rows: list[dict], labels) -> pd.DataFrame:
    if not rows:
        return _empty_frame(labels)
    df = pd.DataFrame(rows, columns=["id", "image", "text", *labels])
    df = df.astype({"id": object, "image": object, "text": object, **{lab: "int64" for lab in labels}})
    return df.sort_values("id", kind="stable").reset_index(drop=True)


# ----------------------------------------------------------------------------- low-level parsing


def _find(base: Path, *parts: str) -> Path | None:
    """`base/parts...` matching each part case-insensitively; None if absent."""
    cur = base
    for part in parts:
        exact = cur / part
        if exact.exists():
            cur = exact
            continue
        if not cur.is_dir():
            return None
        match = [p for p in cur.iterdir() if p.name.lower() == part.lower()]
        if not match:
            return None
        cur = sorted(match)[0]
    return cur


def _norm(name: str) -> str:
    """Header cell -> key: 'Text Transcription ' -> 'texttranscription'."""
    return "".join(ch for ch in name.strip().strip('"').lower() if ch.isalnum())


def _decoded_lines(path: Path) -> list[tuple[int, str | None, bytes]]:
    """(line number, text or None when not UTF-8, raw bytes) per non-empty line; BOM and CR stripped."""
    data = path.read_bytes()
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    out = []
    for i, raw in enumerate(data.split(b"\n"), start=1):
        raw = raw.rstrip(b"\r")
        if not raw.strip():
            continue
        try:
            out.append((i, raw.decode("utf-8"), raw))
        except UnicodeDecodeError:
            out.append((i, None, raw))
    return out


def _unquote(text: str) -> str:
    text = text.strip("\r")
    if len(text) >= 2 and text[0] == '"' and text[-1] == '"':
        text = text[1:-1].replace('""', '"')
    return text


def _parse_label(value: str) -> int | None:
    value = str(value).strip().strip('"').lower()
    if value in ("1", "1.0", "true"):
        return 1
    if value in ("0", "0.0", "false"):
        return 0
    return None


def _read_table(path: Path, rows: _Rows, expected: list[str], header: bool, where: str):
    """Yield (line, {key: value}) for a tab- (or comma-) separated file.

    `expected` lists the normalised keys in their official order; with a header
    the columns are matched by name (any order, any spacing), without one by
    position. The text column is last in the official files, so surplus tabs
    are taken to belong to the text.
    """
    lines = _decoded_lines(path)
    if not lines:
        return
    sep, order = "\t", expected
    if header:
        first_no, first, _ = lines.pop(0)
        if first is None:
            raise MamikitError(f"{path}: header line is not UTF-8")
        tab_cells = [_norm(c) for c in first.split("\t")]
        comma_cells = [_norm(c) for c in next(csv.reader([first]))]
        if "filename" not in tab_cells and "filename" in comma_cells:
            sep, cells = ",", comma_cells
            log.warning("%s: header is comma-separated; reading the file as CSV", path)
        else:
            cells = tab_cells
        missing = [k for k in expected if k not in cells and not (k == "texttranscription" and "text" in cells)]
        if "filename" in missing:
            raise MamikitError(f"{path}: no file_name column in the header {first!r}")
        cells = ["texttranscription" if c == "text" and "texttranscription" in expected else c for c in cells]
        order = cells
        if missing:
            log.warning("%s: columns %s are missing; their values are read as unknown", path, missing)
    text_key = "texttranscription"
    for line_no, text, raw in lines:
        if text is None:
            name = raw.split(b"\t")[0].split(b",")[0].decode("latin-1").strip()
            rows.problem(name, "text is not valid UTF-8", where, line_no)
            continue
        if sep == ",":
            cells = next(csv.reader([text]))
        else:
            cells = text.split("\t")
            if len(cells) > len(order) and order and order[-1] == text_key:
                cells = cells[: len(order) - 1] + ["\t".join(cells[len(order) - 1 :])]
        if len(cells) != len(order):
            # a missing trailing text column is an empty text, anything else is malformed
            if len(cells) == len(order) - 1 and order[-1] == text_key:
                cells = cells + [""]
            else:
                name = cells[0].strip() if cells else "?"
                rows.problem(name, f"expected {len(order)} columns, found {len(cells)}", where, line_no)
                continue
        yield line_no, dict(zip(order, cells))


def _image_path(folder: Path, name: str, rows: _Rows, where: str, line: int, meme: str | None = None) -> str | None:
    """Absolute path of an image named in a data file, or None after reporting a problem.

    `meme` names the row in the report when it differs from the image name (FBHM ids).
    """
    who, what = (name, "") if meme is None else (meme, f" {name}")
    try:
        path = inside(folder, name)
    except MamikitError as exc:
        rows.problem(who, f"rejected file name: {exc}", where, line)
        return None
    if not path.is_file():
        rows.problem(who, f"image{what} not found", where, line)
        return None
    return str(path)


def _parse_labels(raws: dict, required: bool) -> tuple[dict[str, int], str | None]:
    """Parse one row's labels; a missing one is UNKNOWN unless `required`. Returns (values, reason or None)."""
    values = {}
    for lab, raw in raws.items():
        if raw is None:
            if required:
                return values, f"missing label {lab}"
            values[lab] = UNKNOWN
            continue
        value = _parse_label(raw)
        if value is None:
            return values, f"unreadable label {lab}={raw.strip() if isinstance(raw, str) else raw!r}"
        values[lab] = value
    return values, None


# ----------------------------------------------------------------------------- MAMI


def _read_mami_csv(path: Path, rows: _Rows, labels, with_labels: bool, where: str) -> dict[str, dict]:
    """Rows of training.csv / Test.csv keyed by file name (first occurrence wins)."""
    keys = ["filename", *(_norm(lab) for lab in labels if with_labels), "texttranscription"]
    out: dict[str, dict] = {}
    first_line: dict[str, int] = {}
    for line, cells in _read_table(path, rows, keys, header=True, where=where):
        name = cells.get("filename", "").strip().strip('"')
        if not name:
            rows.problem("?", "empty file name", where, line)
            continue
        if name in out:
            rows.problem(name, f"duplicate file name (first on line {first_line[name]})", where, line)
            continue
        values, bad = _parse_labels({lab: cells.get(_norm(lab)) for lab in (labels if with_labels else ())},
                                    required=False)
        if bad:
            rows.problem(name, bad, where, line)
            continue
        image = _image_path(path.parent, name, rows, where, line)
        if image is None:
            continue
        first_line[name] = line
        out[name] = {"id": name, "image": image, "text": _unquote(cells.get("texttranscription", "")), **values,
                     "_line": line}
    return out


def _read_mami_labels(path: Path, rows: _Rows, labels, where: str) -> dict[str, dict[str, int]]:
    """test_labels.txt: file name and the five labels per line, no header."""
    out: dict[str, dict[str, int]] = {}
    for line, text, _raw in _decoded_lines(path):
        if text is None:
            rows.problem("?", "line is not valid UTF-8", where, line)
            continue
        cells = [c.strip() for c in (text.split("\t") if "\t" in text else text.replace(",", " ").split())]
        if line == 1 and cells and _norm(cells[0]) == "filename":
            continue  # tolerate a header
        if len(cells) != 1 + len(labels):
            rows.problem(cells[0] if cells else "?", f"expected {1 + len(labels)} columns, found {len(cells)}",
                         where, line)
            continue
        name, values = cells[0], [_parse_label(c) for c in cells[1:]]
        if any(v is None for v in values):
            rows.problem(name, f"unreadable label in {cells[1:]}", where, line)
            continue
        if name in out:
            rows.problem(name, "duplicate file name", where, line)
            continue
        out[name] = dict(zip(labels, values))
    return out


def _read_mami(folder: Path, labels, drop_inconsistent: bool) -> tuple[_Rows, list[dict], list[dict], int, list[str]]:
    rows = _Rows("MAMI", labels)
    notes: list[str] = []
    train_csv = _find(folder, "TRAINING", "training.csv")
    train: list[dict] = []
    dropped = 0
    if train_csv is None:
        notes.append(f"{folder}: no TRAINING/training.csv; MAMI train and dev are empty")
    else:
        where = str(train_csv.relative_to(folder))
        for row in _read_mami_csv(train_csv, rows, labels, True, where).values():
            sub = [row[lab] for lab in labels[1:]]
            if drop_inconsistent and row[labels[0]] == 0 and any(v == 1 for v in sub):
                dropped += 1
                log.debug("MAMI %s dropped: sub-labels set while %s is 0 (%s line %s)", row["id"], labels[0],
                          where, row["_line"])
                continue
            train.append(row)
        if dropped:
            notes.append(f"dropped {dropped} training rows whose sub-labels are set while {labels[0]} is 0")
    test: list[dict] = []
    test_csv = _find(folder, "test", "Test.csv")
    label_file = _find(folder, "test_labels.txt") or _find(folder, "test", "test_labels.txt")
    if test_csv is not None:
        where = str(test_csv.relative_to(folder))
        memes = _read_mami_csv(test_csv, rows, labels, False, where)
        gold = {}
        if label_file is not None:
            gold = _read_mami_labels(label_file, rows, labels, str(label_file.relative_to(folder)))
            for name in sorted(set(gold) - set(memes)):
                rows.problem(name, "in test_labels.txt but not a usable row of Test.csv", "test_labels.txt", None)
        unlabelled = 0
        for name, row in memes.items():
            values = gold.get(name)
            if values is None:
                unlabelled += 1
                values = {lab: UNKNOWN for lab in labels}
            test.append({**row, **values})
        if unlabelled:
            notes.append(f"{unlabelled} MAMI test memes have no gold labels (label -1)")
    else:
        notes.append(f"{folder}: no test/Test.csv; MAMI test is empty")
    return rows, train, test, dropped, notes


# ----------------------------------------------------------------------------- FBHM and other JSON-lines datasets


def _json_lines(path: Path, rows: _Rows):
    """Yield (line, decoded JSON value) of a JSON-lines file; a line that is not UTF-8 or not JSON is a problem."""
    for line, text, _raw in _decoded_lines(path):
        if text is None:
            rows.problem("?", "text is not valid UTF-8", path.name, line)
            continue
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            rows.problem("?", f"not valid JSON ({exc.msg})", path.name, line)
            continue
        yield line, value


def _read_jsonl(path: Path, folder: Path, rows: _Rows, labels, label_required: bool) -> list[dict]:
    where = path.name
    out, seen = [], {}
    for line, obj in _json_lines(path, rows):
        if not isinstance(obj, dict) or obj.get("id") in (None, ""):
            rows.problem("?", "no id", where, line)
            continue
        meme_id = str(obj["id"]).strip()
        if meme_id in seen:
            rows.problem(meme_id, f"duplicate id (first on line {seen[meme_id]})", where, line)
            continue
        raws = {lab: obj.get(lab, obj.get("label") if len(labels) == 1 else None) for lab in labels}
        values, bad = _parse_labels(raws, required=label_required)
        if bad:
            rows.problem(meme_id, bad, where, line)
            continue
        img = obj.get("img")
        if not isinstance(img, str) or not img.strip():
            rows.problem(meme_id, "no img", where, line)
            continue
        image = _image_path(folder, img.strip(), rows, where, line, meme=meme_id)
        if image is None:
            continue
        text_value = obj.get("text", "")
        seen[meme_id] = line
        out.append({"id": meme_id, "image": image, "text": "" if text_value is None else str(text_value), **values,
                    "_line": line})
    return out


def _read_fbhm(folder: Path, dataset: str, labels) -> tuple[_Rows, list[dict], list[dict], list[str]]:
    rows = _Rows(dataset, labels)
    notes: list[str] = []
    files = {stem: _find(folder, f"{stem}.jsonl") for stem in FBHM_FILES}
    if files["train"] is None:
        notes.append(f"{folder}: no train.jsonl; {dataset} train and dev are empty")
    train = _read_jsonl(files["train"], folder, rows, labels, True) if files["train"] else []
    train_ids = {r["id"] for r in train}
    test, test_ids, unlabelled = [], {}, 0
    for stem in FBHM_FILES[1:]:
        if files[stem] is None:
            continue
        for row in _read_jsonl(files[stem], folder, rows, labels, False):
            if any(row[lab] == UNKNOWN for lab in labels):
                unlabelled += 1
                continue
            if row["id"] in train_ids:
                rows.problem(row["id"], "held-out meme also in train.jsonl; kept in train only", f"{stem}.jsonl",
                             row["_line"])
                continue
            if row["id"] in test_ids:
                first = test_ids[row["id"]]
                if any(first[lab] != row[lab] for lab in labels):
                    rows.problem(row["id"], "labels disagree with an earlier held-out file; the first is kept",
                                 f"{stem}.jsonl", row["_line"])
                continue
            test_ids[row["id"]] = row
            test.append(row)
    if unlabelled:
        notes.append(f"{unlabelled} unlabelled held-out {dataset} rows are not used")
    return rows, train, test, notes


# ----------------------------------------------------------------------------- the "splits" layout (any modality)

SPLIT_SUFFIXES = (".jsonl", ".csv")


def _split_file(folder: Path, stem: str, dataset: str) -> Path | None:
    """`folder/<stem>.jsonl` or `.csv`; MamikitError when both are there (which one is meant?)."""
    found = [f for f in (_find(folder, stem + suffix) for suffix in SPLIT_SUFFIXES) if f is not None and f.is_file()]
    if len(found) > 1:
        raise MamikitError(f"{folder}: {dataset} has both {found[0].name} and {found[1].name}; keep one")
    return found[0] if found else None


def _split_records(path: Path, rows: _Rows):
    """Yield (line, {column: value}) of a JSONL or CSV split file; unreadable lines become problems."""
    where = path.name
    if path.suffix.lower() == ".jsonl":
        for line, obj in _json_lines(path, rows):
            if not isinstance(obj, dict):
                rows.problem("?", "not a JSON object", where, line)
                continue
            yield line, obj
        return
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = path.read_bytes()[: exc.start].count(b"\n") + 1
        raise MamikitError(f"{path}: not UTF-8 text (line {line})") from None
    reader = csv.reader(text.splitlines(keepends=True))
    header = next(reader, None)
    if header is None:
        return
    keys = [c.strip() for c in header]
    if "id" not in keys:
        raise MamikitError(f"{path}: no id column in the header {header!r}")
    for cells in reader:
        line = reader.line_num
        if not any(c.strip() for c in cells):
            continue
        if len(cells) != len(keys):
            rows.problem(cells[0].strip() if cells else "?", f"expected {len(keys)} columns, found {len(cells)}",
                         where, line)
            continue
        yield line, dict(zip(keys, cells))


def _read_split_file(path: Path, folder: Path, rows: _Rows, labels, modalities, label_required: bool,
                     seen: dict) -> list[dict]:
    """The rows of one split file of the "splits" layout; `seen` (id -> where) spans the dataset's files."""
    where = path.name
    out = []
    for line, rec in _split_records(path, rows):
        meme_id = str(rec.get("id") if rec.get("id") is not None else "").strip()
        if not meme_id:
            rows.problem("?", "no id", where, line)
            continue
        if meme_id in seen:
            rows.problem(meme_id, f"duplicate id (first in {seen[meme_id]})", where, line)
            continue
        raws = {lab: rec.get(lab, rec.get("label") if len(labels) == 1 else None) for lab in labels}
        raws = {lab: None if raw == "" else raw for lab, raw in raws.items()}  # an empty CSV cell: no label
        values, bad = _parse_labels(raws, required=label_required)
        if bad:
            rows.problem(meme_id, bad, where, line)
            continue
        text = ""
        if "text" in modalities:
            text = rec.get("text")
            if not isinstance(text, str) or not text.strip():
                rows.problem(meme_id, "no text", where, line)
                continue
        image = None
        if "image" in modalities:
            img = rec.get("img")
            if not isinstance(img, str) or not img.strip():
                rows.problem(meme_id, "no img", where, line)
                continue
            image = _image_path(folder, img.strip(), rows, where, line, meme=meme_id)
            if image is None:
                continue
        seen[meme_id] = f"{where} line {line}"
        out.append({"id": meme_id, "image": image, "text": text, **values, "_line": line})
    return out


def _read_splits(folder: Path, dataset: str, labels, modalities):
    """A dataset in the "splits" layout -> (rows, train, dev or None (split from train), test, notes)."""
    _refuse_unfinished_synthetic_set(folder)  # `synthetic.generate_single` marks its folder
    rows = _Rows(dataset, labels)
    notes: list[str] = []
    files = {stem: _split_file(folder, stem, dataset) for stem in SPLITS}
    seen: dict[str, str] = {}
    read = {stem: _read_split_file(path, folder, rows, labels, modalities, stem != "test", seen)
            for stem, path in files.items() if path is not None}
    if files["train"] is None:
        notes.append(f"{folder}: no train.jsonl or train.csv; {dataset} train is empty")
    if files["dev"] is None:
        notes.append(f"{folder}: no dev file; {dataset} dev is an 80/20 split of train")
    if files["test"] is None:
        notes.append(f"{folder}: no test file; {dataset} test is empty")
    return rows, read.get("train", []), read.get("dev"), read.get("test", []), notes


# ----------------------------------------------------------------------------- splits


def _merge_rare(keys: np.ndarray, n_dev: int) -> np.ndarray:
    """Merge the rarest strata until each has >= 2 rows and both sides can hold one per stratum."""
    keys = keys.astype(object).copy()
    n = len(keys)
    while True:
        counts = Counter(keys)
        if len(counts) <= 1:
            return keys
        if min(counts.values()) >= 2 and len(counts) <= min(n_dev, n - n_dev):
            return keys
        # smallest stratum into the second smallest (ties broken by name: deterministic)
        ordered = sorted(counts.items(), key=lambda kv: (kv[1], str(kv[0])))
        (small, _), (target, _) = ordered[0], ordered[1]
        keys[keys == small] = target


def stratified_split(ids, combos, dev_fraction: float = 0.2, seed: int = 0) -> tuple[list, list]:
    """Split ids into (train, dev), stratified on `combos` (one hashable label combination per id).

    Deterministic for a seed and independent of the input order. Strata with a
    single row are merged with other rare strata so scikit-learn can stratify.
    """
    from sklearn.model_selection import train_test_split

    ids = list(ids)
    if len(ids) != len(combos):
        raise ValueError("ids and combos differ in length")
    if not 0.0 < dev_fraction < 1.0:
        raise MamikitError(f"dev_fraction must be in (0, 1), got {dev_fraction}")
    order = sorted(range(len(ids)), key=lambda i: str(ids[i]))
    ids = [ids[i] for i in order]
    keys = np.array(["|".join(map(str, combos[i])) if isinstance(combos[i], (tuple, list)) else str(combos[i])
                     for i in order], dtype=object)
    n = len(ids)
    if n < 2:
        return ids, []
    n_dev = max(1, math.ceil(dev_fraction * n))
    keys = _merge_rare(keys, n_dev)
    stratify = keys if len(set(keys)) > 1 else None
    train, dev = train_test_split(ids, test_size=n_dev, random_state=seed, shuffle=True, stratify=stratify)
    return sorted(train, key=str), sorted(dev, key=str)


# random_state of the authors' train_test_split (row 13 of docs/fidelity.md).
AUTHORS_SPLIT_SEED = 3704


def authors_split(ids, combos, dev_fraction: float = 0.2, seed: int = AUTHORS_SPLIT_SEED) -> tuple[list, list]:
    """Split ids into (train, dev) as the authors' code: ``train_test_split`` on the rows in file order.

    Their call is ``train_test_split(df, test_size=1 - 0.8, train_size=0.8,
    random_state=3704, stratify=df[labels])`` on the training file's rows (MAMI
    after dropping its inconsistent rows): stratified on the label columns,
    which scikit-learn joins into one label combination per row. The order of
    `ids` is the order of the file and decides the result. Where a label
    combination holds a single row (their call would stop with an error), the
    rare combinations are merged first as in :func:`stratified_split`.

    Returns:
        (train ids, dev ids) in the order the authors' split returns them.
    """
    from sklearn.model_selection import train_test_split

    ids = list(ids)
    if len(ids) != len(combos):
        raise ValueError("ids and combos differ in length")
    if not 0.0 < dev_fraction < 1.0:
        raise MamikitError(f"dev_fraction must be in (0, 1), got {dev_fraction}")
    if len(ids) < 2:
        return ids, []
    table = np.array([list(c) if isinstance(c, (tuple, list)) else [c] for c in combos])  # (N, L) the label columns
    # Their sizes: train_size = 0.8 and test_size = 1 - 0.8 (0.19999999999999996, not 0.2).
    train_frac = 1.0 - dev_fraction
    sizes = dict(test_size=1 - train_frac, train_size=train_frac, random_state=seed)
    try:
        train, dev = train_test_split(ids, stratify=table, **sizes)
    except ValueError:  # a combination too rare to stratify
        keys = np.array(["|".join(map(str, row)) for row in table], dtype=object)
        keys = _merge_rare(keys, max(1, math.ceil(dev_fraction * len(ids))))
        train, dev = train_test_split(ids, stratify=keys if len(set(keys)) > 1 else None, **sizes)
    return list(train), list(dev)


def _split_rows(rows: list[dict], labels, dev_fraction: float, seed: int,
                authors: bool = False) -> tuple[list[dict], list[dict]]:
    combos = [tuple(r[lab] for lab in labels) for r in rows]
    split = authors_split if authors else stratified_split
    train_ids, dev_ids = split([r["id"] for r in rows], combos, dev_fraction, *(() if authors else (seed,)))
    by_id = {r["id"]: r for r in rows}
    return [by_id[i] for i in train_ids], [by_id[i] for i in dev_ids]


# ----------------------------------------------------------------------------- public entry points


def _present(root: Path, names) -> list[str]:
    return [name for name in names if _find(root, name) is not None and _find(root, name).is_dir()]


def _read_dataset(root: Path, name: str, labels: tuple[str, ...], drop_inconsistent: bool, tasks_path=None):
    """One dataset in its layout -> (rows, train, dev or None (an 80/20 split of train), test, dropped, notes)."""
    folder = _find(root, name)
    if folder is None or not folder.is_dir():
        raise MamikitError(f"{root}: no {name}/ folder")
    layout, dev, dropped = dataset_layout(name, tasks_path), None, 0
    if layout == "mami":
        rows, train, test, dropped, notes = _read_mami(folder, labels, drop_inconsistent)
    elif layout == "hateful_memes":
        rows, train, test, notes = _read_fbhm(folder, name, labels)
    else:
        rows, train, dev, test, notes = _read_splits(folder, name, labels, dataset_modalities(name, tasks_path))
    return rows, train, dev, test, dropped, notes


def _refuse_unfinished_synthetic_set(root: Path) -> None:
    """A synthetic set whose `synth` was killed is incomplete: say so instead of training on part of it."""
    from .synthetic import MARKER
    from .utils import read_json

    marker = root / MARKER
    if marker.exists():
        info = read_json(marker)
        if isinstance(info, dict) and info.get("complete") is False:
            raise MamikitError(f"{marker}: the synthetic set is unfinished (`synth` was interrupted); "
                               f"re-run `python -m mamikit synth --out {root}` with the same settings")


def load_datasets(root, datasets=None, split_seed: int = 0, dev_fraction: float = 0.2, *,
                  drop_inconsistent: bool = True, tasks_path=None,
                  authors_split: bool = False) -> dict[str, DatasetSplits]:
    """Read every dataset under `root` into stratified train/dev and the official test split.

    Images are checked for existence only (no decoding; `check` decodes them).

    Args:
        root: data folder holding MAMI/ and/or FBHM/ (or other datasets named in mamikit/tasks.json).
        datasets: names to read; None = every dataset of tasks.json whose folder exists.
        split_seed: seed of the 80/20 train/dev split.
        dev_fraction: share of the labelled training data that goes to dev.
        drop_inconsistent: drop MAMI training rows with sub-labels but misogynous 0.
        tasks_path: a tasks file other than mamikit/tasks.json.
        authors_split: split train/dev as the authors' code (:func:`authors_split`; `split_seed` unused).
    Returns:
        {dataset: DatasetSplits}; each split a DataFrame with columns id, image, text, <labels>.
    """
    root = Path(root)
    if not root.is_dir():
        raise MamikitError(f"{root}: data folder not found")
    _refuse_unfinished_synthetic_set(root)
    known = tasks_config(tasks_path)["datasets"]
    if datasets is None:
        datasets = _present(root, known)
        if not datasets:
            raise MamikitError(f"{root}: no dataset folder ({', '.join(known)}) found")
    elif isinstance(datasets, str):
        datasets = [datasets]
    out: dict[str, DatasetSplits] = {}
    for name in datasets:
        if name not in known:
            raise MamikitError(f"unknown dataset {name!r}; mamikit/tasks.json lists {', '.join(known)}")
        labels = tuple(known[name]["labels"])
        rows, train_rows, dev_rows, test_rows, dropped, notes = _read_dataset(root, name, labels, drop_inconsistent,
                                                                             tasks_path)
        if dev_rows is None:
            train, dev = _split_rows(train_rows, labels, dev_fraction, split_seed, authors_split)
        else:  # a dev file of its own (the "splits" layout)
            train, dev = train_rows, dev_rows
        splits = {"train": _frame(train, labels), "dev": _frame(dev, labels), "test": _frame(test_rows, labels)}
        out[name] = DatasetSplits(name, labels, splits, rows.problems, dropped, notes)
        for p in rows.problems[:20]:
            log.warning("%s", p)
        if len(rows.problems) > 20:
            log.warning("%s: %d more problems (run `python -m mamikit check --data %s`)", name,
                        len(rows.problems) - 20, root)
        for note in notes:
            log.info("%s: %s", name, note)
    return out


def require_datasets(root, names, where: dict | None = None) -> None:
    """MamikitError naming each dataset of `names` that has no folder under `root`, and how to get it.

    Args:
        root: the data folder.
        names: the datasets a study needs (`Settings.datasets()`).
        where: dataset -> a hint on how it gets there (e.g. the notebook parameter that unpacks its zip).
    """
    root = Path(root)
    missing = [n for n in names if not _present(root, [n])]
    if missing:
        hints = "; ".join(f"{n}: {(where or {}).get(n, f'put its folder at {root / n}')}" for n in missing)
        raise MamikitError(f"{root}: no {' or '.join(missing)} folder, and the rounds of these settings train on "
                           f"{', '.join(names)} ({hints})")


def check(root, datasets=None, decode: bool = True, workers: int = 8,
          progress: bool = True) -> dict[str, DatasetSplits]:
    """Read the datasets like :func:`load_datasets` and also decode every image.

    Images that fail to decode become problems (and their rows leave the splits).
    """
    from tqdm.auto import tqdm

    result = load_datasets(root, datasets)
    if not decode:
        return result
    for name, ds in result.items():
        frames = [(split, df) for split, df in ds.splits.items() if len(df)]
        jobs = [(split, i, row.id, row.image)  # a dataset without images has nothing to decode
                for split, df in frames for i, row in enumerate(df.itertuples(index=False)) if row.image is not None]

        def _decode(job):
            try:
                open_image_rgb(job[3])
                return None
            except MamikitError as exc:
                return str(exc).replace(f"{job[3]}: ", "")

        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            reasons = list(tqdm(pool.map(_decode, jobs), total=len(jobs), desc=f"decode {name}", disable=not progress))
        bad = {split: [] for split in ds.splits}
        for (split, i, meme_id, image), reason in zip(jobs, reasons):
            if reason is not None:
                ds.problems.append(Problem(name, str(meme_id), f"unreadable image: {reason} ({split})"))
                bad[split].append(i)
        for split, idx in bad.items():
            if idx:
                ds.splits[split] = ds.splits[split].drop(index=idx).reset_index(drop=True)
    return result
