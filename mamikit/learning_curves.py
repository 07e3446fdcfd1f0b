"""Learning curves: scores and training losses against the optimiser step (section 4's evaluations over time).

Section 4 evaluates several times per epoch; figure 5 pools those evaluations
per experiment. Drawn against the step, the same `log.jsonl` rows show how a
run learnt: the official score of a task on a split after each evaluation, and,
where the trainer logged them, its training loss terms. Evaluation rows are the
rows `mamikit.analysis.official_scores` selects; loss rows carry
``"kind": "loss"`` and name their term in ``metric`` (``"loss"`` for the total;
a per-task term also names its ``task``).
"""

from __future__ import annotations

import os

import numpy as np
import pandas as pd

from .analysis import official_scores, read_logs
from .viz import save_png

CURVE_COLUMNS = ("run", "experiment", "seed", "line", "kind", "split", "task", "term", "step", "value")
TOTAL_LOSS = "loss"  # the term name of the summed training loss


def _line_names(rows: pd.DataFrame) -> pd.Series:
    """One legend entry per run: "02 seed 0", or the run folder when two runs share experiment and seed."""
    name = rows["experiment"].astype(str) + " seed " + rows["seed"].astype(str)
    clash = rows.groupby(name)["run"].transform("nunique") > 1
    return name.where(~clash, rows["run"])


def curve_rows(logs: pd.DataFrame) -> pd.DataFrame:
    """Score and loss rows of run logs (from `read_logs`) in one frame with the columns CURVE_COLUMNS.

    Score rows (kind "score") are the official task scores of each evaluation
    (term "score"); loss rows (kind "loss") keep their split, task and term.
    """
    if logs.empty:
        return pd.DataFrame(columns=CURVE_COLUMNS)
    kind = logs["kind"] if "kind" in logs else pd.Series(np.nan, index=logs.index)
    is_loss = kind == "loss"
    scores = official_scores(logs[~is_loss]).assign(kind="score", term="score")
    losses = logs[is_loss].assign(kind="loss")
    if len(losses):
        task = losses["task"].where(losses["task"].notna(), "")
        metric = losses["metric"].astype(str)
        # "<task>/<term>" for a task's own term unless the metric already names the task
        losses = losses.assign(term=metric.where((task == "") | metric.str.contains("/"), task + "/" + metric))
    rows = pd.concat([scores, losses], ignore_index=True) if len(losses) else scores.reset_index(drop=True)
    rows = rows.assign(step=pd.to_numeric(rows["step"], errors="coerce"), value=pd.to_numeric(rows["value"], errors="coerce"))
    rows = rows.dropna(subset=["step", "value"])
    rows["line"] = _line_names(rows) if len(rows) else pd.Series(dtype=object)
    return rows[list(CURVE_COLUMNS)].sort_values(["experiment", "seed", "run", "kind", "term", "step"], kind="stable").reset_index(drop=True)


def read_curves(runs_root: str | os.PathLike) -> pd.DataFrame:
    """The learning-curve rows (`curve_rows`) of every run under `runs_root`."""
    return curve_rows(read_logs(runs_root))


def loss_terms(curves: pd.DataFrame) -> list[str]:
    """The training loss terms logged, the total first."""
    terms = sorted(set(curves.loc[curves["kind"] == "loss", "term"]))
    return sorted(terms, key=lambda t: t != TOTAL_LOSS)


def plot_learning_curves(curves: pd.DataFrame, task: str, split: str = "dev", loss_term: str | None = TOTAL_LOSS,
                         runs: list[str] | None = None, path=None):
    """Score of `task` on `split` against the step, beside a training loss term, one line per experiment and seed.

    Args:
        curves: rows from `curve_rows` / `read_curves`.
        task: the task whose official score is drawn ("Task_A").
        split: "train", "dev" or "test".
        loss_term: the loss term of the right panel (None: no loss panel); drawn only where logged.
        runs: keep only these runs (their `run` folder names); None for all.
        path: also write a PNG here.
    Returns:
        A matplotlib Figure: one axes for the score, a second for the loss where loss rows exist.
    """
    from matplotlib.figure import Figure

    if runs is not None:
        curves = curves[curves["run"].isin(runs)]
    score = curves[(curves["kind"] == "score") & (curves["task"] == task) & (curves["split"] == split)]
    loss = curves[(curves["kind"] == "loss") & (curves["term"] == loss_term)] if loss_term else curves.iloc[:0]
    panels = [("score", score, f"{task} score on {split}")] + ([("loss", loss, f"training {loss_term}")] if len(loss) else [])
    fig = Figure(figsize=(5.2 * len(panels) + 1.6, 3.8), dpi=120, layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    lines = list(dict.fromkeys(curves.sort_values(["experiment", "seed", "run"])["line"]))
    experiments = list(dict.fromkeys(curves.sort_values("experiment")["experiment"]))
    colours = {e: f"C{i % 10}" for i, e in enumerate(experiments)}
    styles = ("-", "--", ":", "-.")
    for ax, (_, rows, title) in zip(axes, panels):
        for line, points in rows.groupby("line", sort=False):
            points = points.sort_values("step")
            seed_rank = sorted(set(curves.loc[curves["experiment"] == points["experiment"].iloc[0], "seed"])).index(points["seed"].iloc[0])
            ax.plot(points["step"], points["value"], color=colours[points["experiment"].iloc[0]],
                    linestyle=styles[seed_rank % len(styles)], marker="o" if len(points) < 30 else None, markersize=3, label=line)
        if rows.empty:
            ax.text(0.5, 0.5, "no rows logged", ha="center", va="center", transform=ax.transAxes, color="0.4")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("optimiser step")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("score")
    handles = {h.get_label(): h for ax in axes for h in ax.get_lines()}
    shown = [name for name in lines if name in handles]
    if shown:
        fig.legend([handles[n] for n in shown], shown, loc="outside right center", fontsize=8, frameon=False)
    fig.suptitle("Learning curves, one line per experiment and seed", fontsize=11)
    return save_png(fig, path)
