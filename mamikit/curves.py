"""Training curves of section 4's loop and the round tables of section 5.1, as a notebook shows them.

What the loop wrote (`mamikit.runlog`: loss rows and evaluation rows in each
run's log.jsonl) is read back by :func:`read_curves`; :func:`plot_curves`
draws learning curves inline, one line per experiment and seed; and
:func:`styled_table` shows one of tables 2-5 as a styled frame with each
score row's best experiment highlighted. The loop never imports this module.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd

from .runlog import LOSS_KIND, loss_tag, score_tag
from .utils import MamikitError, get_logger

log = get_logger(__name__)

BEST_STYLE = "font-weight: bold; background-color: #c7e9c0"  # a row's best cell in styled_table


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
                    base = (run, str(path.parent.resolve()), str(row["experiment"]), int(row["seed"]),
                            int(row["epoch"]), int(row["step"]))
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
