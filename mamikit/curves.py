"""Training curves of section 4's loop and the round tables of section 5.1, as a notebook shows them.

What the loop wrote (`mamikit.runlog`: loss rows and evaluation rows in each
run's log.jsonl) is read back by :func:`read_curves`; :func:`plot_curves`
draws learning curves (also as PNG + PDF), one line per experiment and seed,
against epochs, optionally smoothed; and
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


def smooth_values(values, smooth: float = 0) -> np.ndarray:
    """A curve's values smoothed as :func:`plot_curves` draws them.

    Args:
        values: the curve's values in step order.
        smooth: 0 (or 1, or None): none. A weight in (0, 1): exponential moving average, s_0 = x_0 and
            s_t = smooth * s_(t-1) + (1 - smooth) * x_t (TensorBoard's slider, without its bias correction).
            An integer of at least 2: the mean of the last `smooth` points (fewer at the start).
    """
    values = pd.Series(np.asarray(values, dtype=float))
    if smooth in (0, 1) or smooth is None:
        return values.to_numpy()
    if 0 < smooth < 1:
        return values.ewm(alpha=1 - smooth, adjust=False).mean().to_numpy()
    if float(smooth).is_integer() and smooth > 1:
        return values.rolling(int(smooth), min_periods=1).mean().to_numpy()
    raise MamikitError(f"smooth={smooth!r}: give 0 (none), an average weight in (0, 1) or a window of 2 or more "
                       "points")


def epoch_positions(frame: pd.DataFrame) -> pd.Series:
    """Each row's place on an epoch axis: epoch e ends at e + 1, steps within an epoch spread evenly.

    An epoch's end is the last step logged in it (the loop evaluates at every epoch's end); the last epoch
    of a run, perhaps still going, is taken as long as the one before it, or, a run's first epoch, as long
    as its last logged step.
    """
    out = pd.Series(np.nan, index=frame.index, dtype=float)
    for _, run in frame.groupby("run_dir", sort=False):
        ends = run.groupby("epoch")["step"].max().sort_index()  # epoch -> its last logged step
        epochs, last = ends.index.to_numpy(), ends.to_numpy(dtype=float)
        starts = np.concatenate([[0.0], last[:-1]])  # an epoch starts where the one before it ended
        lengths = last - starts
        if len(lengths) > 1:
            lengths[-1] = lengths[-2]  # the last epoch may be unfinished: the one before it sets its length
        k = np.searchsorted(epochs, run["epoch"].to_numpy())
        out[run.index] = epochs[k] + (run["step"].to_numpy(dtype=float) - starts[k]) / np.maximum(lengths[k], 1)
    return out


def curve_names(curve: str) -> tuple[str, str]:
    """A curve's (panel title, y axis label) as a reader names them: ("Task_A score on dev", "Task_A score")."""
    if curve == "lr":
        return "learning rate", "learning rate"
    if curve.startswith("loss/"):
        term = curve[len("loss/"):]
        return ("training loss" if term == "total" else f"training loss: {term}"), "loss"
    parts = curve.split("/")
    if len(parts) < 3:
        return curve, curve
    metric, split, task, label = parts[0], parts[1], parts[2], "/".join(parts[3:])
    name = f"{task} {label} {metric}" if label else f"{task} {metric}"
    return f"{name} on {split}", name


def plot_curves(runs, metric=("loss/total", "score/dev/Task_A"), experiments=None, smooth: float = 0, path=None,
                x: str = "epoch", labels: dict | None = None):
    """Learning curves, one panel per curve name and one line per experiment and seed.

    Args:
        runs: what :func:`read_curves` reads, or its frame.
        metric: one curve name or several (see :func:`read_curves`), e.g. "score/test/Task_B", "lr".
        experiments: only these experiments (default: all).
        smooth: 0: as logged; a weight in (0, 1): exponential moving average; an integer of at least 2: running
            mean over that many points (:func:`smooth_values`). The logged line stays, faint, behind.
        path: also write the figure as `<stem>.png` and `<stem>.pdf` there.
        x: "epoch" (epochs, evaluations within one spread by their step) or "step" (batches).
        labels: experiment -> legend text; default: its name and the switches that tell it apart from the
            others plotted, from the runs' config.json (`analysis.experiment_labels`). A line of one of
            several seeds adds ", seed <k>".
    Returns:
        The matplotlib Figure; its legend (below the panels) holds one entry per line.
    """
    from matplotlib.figure import Figure

    from .analysis import experiment_configs, experiment_labels, read_configs
    from .viz import save_figure

    if x not in ("epoch", "step"):
        raise MamikitError(f"x must be 'epoch' or 'step', not {x!r}")
    smooth_values([0.0], smooth)  # an unusable value fails before anything is drawn
    frame = runs if isinstance(runs, pd.DataFrame) else read_curves(runs)
    metrics = [metric] if isinstance(metric, str) else list(metric)
    if experiments is not None:
        frame = frame[frame["experiment"].isin([str(e) for e in experiments])]
    missing = [m for m in metrics if m not in set(frame["curve"])]
    if missing:
        known = sorted(c for c in set(frame["curve"]) if c.count("/") < 3)
        raise MamikitError(f"no curve {', '.join(missing)} in these runs; there are: {', '.join(known) or 'none'}")
    frame = frame.assign(x=epoch_positions(frame) if x == "epoch" else frame["step"].astype(float))
    names = sorted(frame["experiment"].unique())
    if labels is None:
        # a run without config.json is named from the registry, without a warning: its curves are all it needs
        labels = experiment_labels(names, experiment_configs(frame, read_configs(frame, warn=False)))
    seeds = frame.groupby("experiment")["seed"].nunique()
    smoothing = "" if smooth in (0, 1, None) else \
        f" (EMA, weight {smooth})" if smooth < 1 else f" (mean of {int(smooth)} points)"
    fig = Figure(figsize=(5.2 * len(metrics), 3.9), dpi=110, layout="constrained")
    colours = {e: f"C{i % 10}" for i, e in enumerate(names)}
    styles = ["-", "--", ":", "-."]
    for k, name in enumerate(metrics):
        ax = fig.add_subplot(1, len(metrics), k + 1)
        rows = frame[frame["curve"] == name]
        for (experiment, seed, run_label), line in rows.groupby(["experiment", "seed", "label"], sort=True):
            text = labels.get(experiment, experiment)
            if run_label != f"{experiment}-seed{seed}":  # two runs share experiment and seed: their folders
                text = f"{text}, {run_label}"
            elif seeds[experiment] > 1:
                text = f"{text}, seed {seed}"
            style = dict(color=colours[experiment], linestyle=styles[seed % len(styles)])
            marker = "o" if not name.startswith(("loss", "lr")) else None
            line = line.sort_values("step", kind="stable")  # the average runs along the steps
            values = smooth_values(line["value"], smooth)
            if smooth not in (0, 1, None):
                ax.plot(line["x"], line["value"], alpha=0.25, linewidth=1, label="_raw", **style)
            ax.plot(line["x"], values, label=text, marker=marker, markersize=3, **style)
        title, ylabel = curve_names(name)
        ax.set_xlabel("epoch" if x == "epoch" else "step (batches)")
        ax.set_ylabel(ylabel)
        ax.set_title(title + smoothing)
        ax.grid(alpha=0.3)
    entries = {}  # legend text -> handle, over every panel (a run may lack a curve another has)
    for ax in fig.axes:
        for handle, text in zip(*ax.get_legend_handles_labels()):
            entries.setdefault(text, handle)
    handles, texts = list(entries.values()), list(entries)
    fig.legend(handles, texts, loc="outside lower center", ncols=min(len(texts), 3), fontsize=8, frameon=False)
    save_figure(fig, path)
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
        best = values.max(axis=1) if higher_is_better else values.min(axis=1)
        is_best = values.eq(best, axis=0) & values.notna()
    elif hasattr(table, "to_frame") and hasattr(table, "best"):
        frame = table.to_frame(digits)  # the cells the Markdown and LaTeX tables set in bold
        is_best = table.best(higher_is_better).reindex(index=frame.index, columns=frame.columns, fill_value=False)
    else:
        raise MamikitError(f"styled_table needs an ExperimentTable or a DataFrame, not {type(table).__name__}")
    css = pd.DataFrame(np.where(is_best.to_numpy(), BEST_STYLE, ""), index=frame.index, columns=frame.columns)
    styler = frame.style.apply(lambda _: css, axis=None)
    if isinstance(table, pd.DataFrame):
        styler = styler.format(precision=digits)
    return styler
