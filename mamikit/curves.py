"""Training curves of section 4's loop and the round tables of section 5.1, as a notebook shows them.

The loop of `mamikit.train` computes the loss of equations 5-6 on every batch
and scores every split several times per epoch (figure 5's samples). A run
keeps both, in its run directory (docs/design.md "Run directory"):

- `log.jsonl` gets, beside the evaluation rows of `mamikit.runs`, one row
  per optimiser step (accumulation window) with "kind": "loss": the step
  (batches seen, the evaluation rows' axis), epoch, learning rate, the number
  of batches and the window's mean of every loss term ("loss", "<task>/bce",
  "proj_align", ...; a task's term is averaged over the batches of its dataset).
- `tensorboard/` holds the same as TensorBoard scalars: `loss/total`,
  `loss/<term>`, `lr`, and every logged score as `<metric>/<split>/<task>`
  (`/<label>` for a label's), so `%tensorboard --logdir <runs>` follows a
  round live.

:class:`TrainingLog` writes both; :func:`read_curves` and :func:`plot_curves`
draw learning curves inline, one line per experiment and seed; and
:func:`styled_table` shows one of tables 2-5 as a styled frame with each
score row's best experiment highlighted.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd

from .utils import MamikitError, append_jsonl, get_logger

log = get_logger(__name__)

LOSS_KIND = "loss"  # the "kind" of a loss row in log.jsonl; evaluation rows have none
TENSORBOARD_DIR = "tensorboard"  # the run directory's TensorBoard folder
PENDING_KEY = "loss_window"  # the loop state's key for the window in progress (kept by the last checkpoint)
BEST_STYLE = "font-weight: bold; background-color: #c7e9c0"  # a row's best cell in styled_table

_warned_no_tensorboard = False


# ----------------------------------------------------------------------------- writing


def _summary_writer(folder: Path, purge_step: int | None):
    """A TensorBoard SummaryWriter, or None (warned once) when tensorboard is not installed."""
    global _warned_no_tensorboard
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        if not _warned_no_tensorboard:
            log.warning("tensorboard is not installed: runs keep their loss rows in log.jsonl but write no "
                        "TensorBoard scalars (pip install tensorboard)")
            _warned_no_tensorboard = True
        return None
    return SummaryWriter(str(folder), purge_step=purge_step, flush_secs=30)


def score_tag(row: dict) -> str:
    """The curve name of an evaluation row: `<metric>/<split>/<task>`, plus `/<label>` for a label's."""
    tag = f"{row['metric']}/{row['split']}/{row['task']}"
    return tag if row.get("label") is None else f"{tag}/{row['label']}"


def loss_tag(term: str) -> str:
    """The curve name of a loss term: `loss/total` for the summed loss, `loss/<term>` otherwise."""
    return "loss/total" if term == "loss" else f"loss/{term}"


class TrainingLog:
    """One run's loss rows (log.jsonl) and TensorBoard scalars, fed by the training loop.

    Per batch the loop calls :meth:`add_batch`, after each optimiser step
    :meth:`end_window`, after each evaluation :meth:`scores`, and :meth:`close`
    when it stops. The window in progress lives in `state[PENDING_KEY]` from
    each evaluation on, so the `last` checkpoint carries it and a resumed run
    writes the same rows as an uninterrupted one. Loss rows are appended at
    each evaluation (one write instead of one per optimiser step); TensorBoard
    gets them at once.
    """

    def __init__(self, run_dir, experiment: str, seed: int, state: dict, resume: bool, tensorboard: bool = True):
        """Open the run's log for writing; `resume` keeps what the last checkpoint's step covers."""
        self.path = Path(run_dir) / "log.jsonl"
        self.experiment, self.seed, self.state = experiment, seed, state
        folder = Path(run_dir) / TENSORBOARD_DIR
        if not resume and folder.exists():
            shutil.rmtree(folder)  # a fresh run: the scalars of an earlier one would mix in
        # On resume, TensorBoard drops what the killed process wrote after the checkpoint (purge_step).
        self.writer = _summary_writer(folder, state["step"] + 1 if resume else None) if tensorboard else None
        self.offset = self.path.stat().st_size if self.path.exists() else 0  # log bytes already sent to TensorBoard
        pending = state.get(PENDING_KEY) or {}
        self.sums = {k: float(v) for k, v in pending.get("sums", {}).items()}  # term -> sum over the window
        self.counts = {k: int(v) for k, v in pending.get("counts", {}).items()}  # term -> batches that had it
        self.lr = pending.get("lr")
        self.rows: list[dict] = []  # loss rows not yet appended to log.jsonl

    def add_batch(self, terms: dict, lr: float) -> None:
        """Add one batch's loss terms (tensors or floats) to the window; `lr` is the rate its step uses."""
        import torch

        for name, value in terms.items():
            # Kept as tensors on the model's device: no synchronisation per batch.
            value = value.detach().to(torch.float64) if isinstance(value, torch.Tensor) else float(value)
            self.sums[name] = self.sums.get(name, 0.0) + value
            self.counts[name] = self.counts.get(name, 0) + 1
        self.lr = float(lr)

    def end_window(self, step: int, epoch: int) -> dict | None:
        """The optimiser stepped: the window's mean terms become a loss row (returned) and scalars."""
        if not self.counts:
            return None
        terms = {name: float(self.sums[name]) / self.counts[name] for name in self.sums}
        row = {"kind": LOSS_KIND, "experiment": self.experiment, "seed": self.seed, "epoch": epoch, "step": step,
               "lr": self.lr, "batches": self.counts.get("loss", max(self.counts.values())), "terms": terms}
        self.rows.append(row)
        if self.writer is not None:
            for name, value in terms.items():
                self.writer.add_scalar(loss_tag(name), value, step)
            self.writer.add_scalar("lr", self.lr, step)
        self.sums, self.counts = {}, {}
        return row

    def scores(self, step: int) -> int:
        """After an evaluation: its log rows become scalars, the loss rows are appended, the window is kept.

        Returns:
            The number of score scalars written.
        """
        written = 0
        for row in self._new_rows():
            if row.get("kind") is None and row.get("step") == step and self.writer is not None:
                self.writer.add_scalar(score_tag(row), float(row["value"]), step)
                written += 1
        self._append_rows()
        self.state[PENDING_KEY] = {"sums": {k: float(v) for k, v in self.sums.items()}, "counts": dict(self.counts),
                                   "lr": self.lr}
        if self.writer is not None:
            self.writer.flush()
        return written

    def close(self) -> None:
        """Append what is buffered and close the TensorBoard writer."""
        self._append_rows()
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def _append_rows(self) -> None:
        append_jsonl(self.path, self.rows)
        self.rows = []
        self.offset = self.path.stat().st_size if self.path.exists() else 0

    def _new_rows(self) -> list[dict]:
        """Whole rows appended to log.jsonl since the last call."""
        if not self.path.exists():
            return []
        with open(self.path, "rb") as fh:
            fh.seek(self.offset)
            data = fh.read()
        end = data.rfind(b"\n") + 1  # a row cut by a kill is read once it is whole
        self.offset += end
        rows = []
        for line in data[:end].decode("utf-8", errors="replace").splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:
                continue
        return rows


# ----------------------------------------------------------------------------- reading


def _run_folders(runs) -> list[tuple[Path, Path]]:
    """(root, log.jsonl) for a run directory, a runs root or a list of either."""
    from .analysis import _log_files

    items = [runs] if isinstance(runs, (str, os.PathLike)) else list(runs)
    found = []
    for item in items:
        root = Path(item)
        if not root.is_dir():
            raise MamikitError(f"{root}: runs folder not found")
        found += [(root, path) for path in _log_files(root)]
    return found


def read_curves(runs) -> pd.DataFrame:
    """Every run's loss, learning-rate and score curves in one long frame.

    Args:
        runs: a run directory, a runs root (searched for `log.jsonl` at any depth) or a list of them.
    Returns:
        Columns run (folder relative to its root), run_dir, experiment, seed, label
        ("<experiment>-seed<k>", or the folder when two runs share it), epoch, step,
        curve (`loss/total`, `loss/<term>`, `lr`, `<metric>/<split>/<task>[/<label>]`) and value.
    """
    records = []
    for root, path in _run_folders(runs):
        rel = path.parent.relative_to(root).as_posix()
        run = rel if rel != "." else path.parent.resolve().name
        with open(path, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                try:
                    row = json.loads(line)
                    base = (run, str(path.parent.resolve()), str(row["experiment"]), int(row["seed"]), int(row["epoch"]), int(row["step"]))
                    if row.get("kind") == LOSS_KIND:
                        records += [(*base, loss_tag(k), float(v)) for k, v in row["terms"].items()]
                        records.append((*base, "lr", float(row["lr"])))
                    elif row.get("kind") is None:
                        records.append((*base, score_tag(row), float(row["value"])))
                except (ValueError, KeyError, TypeError, AttributeError):
                    continue  # a row cut by a kill; analysis.read_logs reports those
    columns = ["run", "run_dir", "experiment", "seed", "epoch", "step", "curve", "value"]
    frame = pd.DataFrame(records, columns=columns)
    # a resumed run that re-evaluated a step keeps the last row, as analysis.official_scores does
    frame = frame.drop_duplicates(["run_dir", "step", "curve"], keep="last")
    label = frame["experiment"] + "-seed" + frame["seed"].astype(str)
    shared = frame.groupby(label)["run_dir"].transform("nunique") > 1
    frame.insert(4, "label", label.where(~shared, frame["run"]))
    return frame.sort_values(["experiment", "seed", "run", "curve", "step"], kind="stable").reset_index(drop=True)


# ----------------------------------------------------------------------------- drawing


def plot_curves(runs, metric=("loss/total", "score/dev/Task_A"), experiments=None, smooth: int = 1, path=None):
    """Learning curves, one panel per curve name and one line per experiment and seed.

    Args:
        runs: what :func:`read_curves` reads, or its frame.
        metric: one curve name or several (see :func:`read_curves`), e.g. "score/test/Task_B", "lr".
        experiments: only these experiments (default: all).
        smooth: a running mean over this many points (1: as logged).
        path: also save the figure as PNG there.
    Returns:
        The matplotlib Figure.
    """
    from matplotlib.figure import Figure

    frame = runs if isinstance(runs, pd.DataFrame) else read_curves(runs)
    metrics = [metric] if isinstance(metric, str) else list(metric)
    if experiments is not None:
        frame = frame[frame["experiment"].isin([str(e) for e in experiments])]
    missing = [m for m in metrics if m not in set(frame["curve"])]
    if missing:
        known = sorted(c for c in set(frame["curve"]) if c.count("/") < 3)
        raise MamikitError(f"no curve {', '.join(missing)} in these runs; there are: {', '.join(known) or 'none'}")
    fig = Figure(figsize=(5.2 * len(metrics), 3.6), dpi=110, layout="constrained")
    colours = {e: f"C{i % 10}" for i, e in enumerate(sorted(frame["experiment"].unique()))}
    styles = ["-", "--", ":", "-."]
    for k, name in enumerate(metrics):
        ax = fig.add_subplot(1, len(metrics), k + 1)
        rows = frame[frame["curve"] == name]
        for (experiment, seed, label), line in rows.groupby(["experiment", "seed", "label"], sort=True):
            values = line["value"].rolling(max(1, int(smooth)), min_periods=1).mean()
            ax.plot(line["step"], values, color=colours[experiment], linestyle=styles[seed % len(styles)], label=label,
                    marker="o" if not name.startswith(("loss", "lr")) else None, markersize=3)
        ax.set_xlabel("step (batches)")
        ax.set_title(name)
        ax.grid(alpha=0.3)
    fig.axes[-1].legend(fontsize=7, loc="best")
    if path is not None:
        from .utils import atomic_write

        with atomic_write(path, "wb") as fh:
            fig.savefig(fh, format="png", dpi=fig.dpi)
    return fig


def styled_table(table, digits: int = 4, higher_is_better: bool = True):
    """A table as a styled DataFrame with each row's best value highlighted.

    Args:
        table: an `analysis.ExperimentTable` (tables 2-5: the best experiment of each score row,
            by mean over seeds, is highlighted; configuration rows are not) or a DataFrame
            (each row's best numeric cell is highlighted).
        digits: decimals of the scores.
        higher_is_better: highlight the largest value (else the smallest).
    Returns:
        A pandas Styler; a notebook renders it as an HTML table.
    """
    if isinstance(table, pd.DataFrame):
        frame = table
        values = table.apply(pd.to_numeric, errors="coerce")
    elif hasattr(table, "to_frame") and hasattr(table, "mean"):
        frame = table.to_frame(digits)
        values = table.mean.reindex(index=frame.index, columns=frame.columns)
    else:
        raise MamikitError(f"styled_table needs an ExperimentTable or a DataFrame, not {type(table).__name__}")
    best = values.max(axis=1) if higher_is_better else values.min(axis=1)
    is_best = values.eq(best, axis=0) & values.notna()
    css = pd.DataFrame(np.where(is_best.to_numpy(), BEST_STYLE, ""), index=frame.index, columns=frame.columns)
    styler = frame.style.apply(lambda _: css, axis=None)
    if isinstance(table, pd.DataFrame):
        styler = styler.format(precision=digits)
    return styler
