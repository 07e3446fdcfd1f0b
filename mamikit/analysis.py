"""Run logs to the paper's results: tables 2-5, figure 5, and the report command.

Section 5.1 of the paper reports, per experiment, its configuration and the
max Task_A / Task_B score on every split (tables 2-5, one per round), and
appendix A / figure 5 compares the per-evaluation test scores of the runs with
Tukey's HSD and box plots. Everything here is rebuilt from the `log.jsonl` rows
the trainer appends (one row per evaluation x split x task x metric), so a
report can be regenerated at any time, also from runs that are still going.

Figures 3 and 4 (t-SNE and attention) need a trained model: `figures_for_run`
loads one through `mamikit.runs` and draws them with `mamikit.viz`.

A paper takes every table as Markdown, CSV and booktabs LaTeX (each score row's best
cell in bold), every figure as PNG and vector PDF (`viz.save_figure`), and each
figure 5 plot with a caption naming the evaluations it pools; experiments are
labelled with their name and the switches that tell them apart (`experiment_labels`).

Longer than mamikit's usual module (about 780 lines): tables, labels, significance tests,
box plots and the report command all read the same log frame; the figures' drawing lives
in viz.py.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import textwrap
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .experiments import EXPERIMENTS, EXTRA_ROWS, ROUND_TABLES, ROUNDS, TABLE_ROWS, display_value
from .registry import official_task_names, primary_dataset
from .utils import MamikitError, atomic_write, get_logger
from .viz import figure_paths, save_figure

log = get_logger(__name__)

LOG_COLUMNS = ("experiment", "seed", "epoch", "step", "split", "task", "label", "metric", "value")

SPLIT_NAMES = {"test": "Test - ", "dev": "Dev - ", "train": "Train-"}  # score rows spelled as in tables 2-5


# ----------------------------------------------------------------------------- reading


def _log_files(runs_root: Path) -> list[Path]:
    """Every log.jsonl under `runs_root` (following links, each real file once), sorted."""
    seen, files = set(), []
    for folder, dirs, names in os.walk(runs_root, followlinks=True):
        dirs.sort()
        if "log.jsonl" in names:
            path = Path(folder) / "log.jsonl"
            real = os.path.realpath(path)
            if real not in seen:
                seen.add(real)
                files.append(path)
    return sorted(files)


def _read_log(path: Path) -> list[dict]:
    """Evaluation rows of one log.jsonl; malformed lines (a run killed mid-write) are skipped with a warning."""
    rows = []
    with open(path, encoding="utf-8", errors="replace") as fh:
        lines = fh.read().split("\n")
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict):
                raise ValueError("not a JSON object")
            if row.get("kind") == "loss":
                continue  # a training loss row (mamikit.curves reads those)
            missing = [c for c in LOG_COLUMNS if c not in row]
            if missing:
                raise ValueError(f"missing {', '.join(missing)}")
        except ValueError as exc:
            what = "truncated last line" if i == last else "malformed line"
            log.warning("%s line %d: %s skipped (%s)", path, i + 1, what, exc)
            continue
        rows.append(row)
    return rows


def read_logs(runs_root: str | os.PathLike) -> pd.DataFrame:
    """Every evaluation row of every run log under `runs_root`, with the run it came from.

    Args:
        runs_root: a folder searched recursively for `log.jsonl` files (for
            example `runs/` holding `round1/02-seed0/log.jsonl`), or one run dir.

    Returns:
        One DataFrame with the log columns (experiment, seed, epoch, step,
        split, task, label, metric, value) plus `run_dir` (absolute path str)
        and `run` (the run folder relative to `runs_root`). Official task scores
        are the rows with metric "score" and a null label.
    """
    root = Path(runs_root)
    if not root.is_dir():
        raise MamikitError(f"{root}: runs folder not found")
    frames = []
    for path in _log_files(root):
        rows = _read_log(path)
        if not rows:
            continue
        frame = pd.DataFrame(rows)
        frame["run_dir"] = str(path.parent.resolve())
        rel = path.parent.relative_to(root).as_posix()
        frame["run"] = rel if rel != "." else path.parent.resolve().name
        frames.append(frame)
    if not frames:
        return pd.DataFrame(columns=[*LOG_COLUMNS, "run_dir", "run"])
    logs = pd.concat(frames, ignore_index=True)
    logs["experiment"] = logs["experiment"].astype(str)
    logs["value"] = pd.to_numeric(logs["value"], errors="coerce")
    return logs


def read_configs(logs: pd.DataFrame, warn: bool = True) -> dict[str, dict]:
    """The `experiment` section of each run's config.json, keyed by run_dir ({} where missing, with a warning
    unless `warn` is False)."""
    configs = {}
    for run_dir in logs["run_dir"].unique():
        path = Path(run_dir) / "config.json"
        try:
            with open(path, encoding="utf-8") as fh:
                configs[run_dir] = dict(json.load(fh).get("experiment") or {})
        except (OSError, ValueError, AttributeError):
            if warn:
                log.warning("%s: missing or unreadable; its configuration rows stay empty", path)
            configs[run_dir] = {}
    return configs


def official_scores(logs: pd.DataFrame) -> pd.DataFrame:
    """The official task score rows (metric "score", null label), one per run x step x split x task.

    A step logged twice (a resumed run re-evaluating) keeps its last row.
    """
    rows = logs[(logs["metric"] == "score") & logs["label"].isna()]
    return rows.drop_duplicates(["run_dir", "step", "split", "task"], keep="last")


def run_max_scores(logs: pd.DataFrame) -> pd.DataFrame:
    """Max official score of each run per split and task (the statistic of tables 2-5)."""
    scores = official_scores(logs)
    keys = ["run_dir", "run", "experiment", "seed", "split", "task"]
    return scores.groupby(keys, sort=False, dropna=False)["value"].max().rename("max").reset_index()


# ----------------------------------------------------------------------------- tables 2-5


def config_display(config: dict) -> dict[str, str]:
    """Configuration rows of tables 2-5 as the paper prints them (Shared, [CLS], Yes, CLIP and DETR), then
    the rows beyond them (`experiments.EXTRA_ROWS`: round 5's switches; "No" or "" where they are off)."""
    from .runs import recorded_values

    config = recorded_values("experiment", config)  # switches a run predates read as off
    if "backbones" in config:  # runs recorded before the field was named image_encoders
        config.setdefault("image_encoders", config.pop("backbones"))
    return {row: display_value(field, config.get(field)) for field, row in TABLE_ROWS + EXTRA_ROWS}


def shown_rows(shown) -> list[str]:
    """The configuration rows a table of these experiments prints (each a `config_display`): the paper's rows,
    and an extra row only where some experiment turns its switch on (tables 2-5 keep the paper's rows)."""
    extra = [row for _, row in EXTRA_ROWS if any(d.get(row) not in ("", "No", None) for d in shown)]
    return [row for _, row in TABLE_ROWS] + extra


# How a table row's displayed value reads in a figure's label ("No" reads "no"); any other row is a Yes/No
# switch, named where it is on.
LABEL_PHRASES = {"Recipe": "{} recipe", "Xformer Enc": "{} encoder", "Pooling": "{} pooling", "Backbones": "{}",
                 "Profile": "{} backbones", "Extra data": "+ {}"}


def experiment_configs(logs: pd.DataFrame, configs: dict[str, dict] | None = None) -> dict[str, dict]:
    """Each experiment's recorded configuration: that of its first run (by folder) with a config.json.

    Args:
        logs: rows from `read_logs` (or `curves.read_curves`): the columns experiment and run_dir.
        configs: run_dir -> experiment config (default: `read_configs(logs)`).
    """
    configs = read_configs(logs) if configs is None else configs
    out: dict[str, dict] = {}
    for experiment, run_dir in sorted(set(zip(logs["experiment"].astype(str), logs["run_dir"]))):
        if experiment not in out and configs.get(run_dir):
            out[experiment] = configs[run_dir]
    return out


def experiment_descriptions(experiments, configs: dict[str, dict] | None = None) -> dict[str, str]:
    """A short description of each experiment: its table 2-5 switches that differ among `experiments`.

    Beside 01-03, "00" is "Shared encoder, [CLS] pooling"; beside 02, "10" is "Proj Algn" and 02 itself "" (a
    Yes/No switch is named where it is on). A configuration comes from `configs` (experiment -> recorded
    config, e.g. `experiment_configs`), else from the registry of the paper's experiments; an experiment in
    neither gets "".
    """
    shown = {}
    for e in map(str, experiments):
        config = (configs or {}).get(e)
        if not config and e in EXPERIMENTS:
            config = dataclasses.asdict(EXPERIMENTS[e])
        shown[e] = config_display(config) if config else {}
    extra = {row for _, row in EXTRA_ROWS}
    # a row beyond the paper's varies where one experiment turns it on and another leaves it off ("" or "No")
    varying = [row for row in shown_rows(shown.values())
               if len({d.get(row) or "" for d in shown.values() if d} if row in extra
                      else {d[row] for d in shown.values() if d.get(row)}) > 1]
    out = {}
    for e, rows in shown.items():
        parts = []
        for row in varying:
            value = rows.get(row, "")
            if row in extra and value in ("", "No"):
                continue  # off: nothing to name
            if row in LABEL_PHRASES and value:
                parts.append(LABEL_PHRASES[row].format("no" if value == "No" else value))
            elif value == "Yes":
                parts.append(row)
        out[e] = ", ".join(parts)
    return out


def experiment_labels(experiments, configs: dict[str, dict] | None = None, sep: str = ": ") -> dict[str, str]:
    """Each experiment as figures name it: "10: Proj Algn" (`sep` joins name and description), or "02" alone.

    The descriptions are :func:`experiment_descriptions` of `experiments` together.
    """
    return {e: f"{e}{sep}{d}" if d else e for e, d in experiment_descriptions(experiments, configs).items()}


def group_labels(scores: pd.DataFrame, configs: dict[str, dict] | None = None, sep: str = ": ") -> dict[str, str]:
    """Each group of `evaluation_scores` as figures name it: its experiment's label, or "02-seed1: ..." for a run."""
    pairs = dict(zip(scores["group"].astype(str), scores["experiment"].astype(str)))
    descriptions = experiment_descriptions(list(dict.fromkeys(pairs.values())), configs)
    return {g: f"{g}{sep}{descriptions[e]}" if descriptions[e] else g for g, e in pairs.items()}


@dataclass
class ExperimentTable:
    """One of tables 2-5: configuration rows and max scores, experiments as columns.

    `mean` and `std` hold, per score row and experiment, the mean and sample
    standard deviation (ddof=1) over seeds of each run's max score; `runs`
    counts the runs behind each column.
    """

    config: pd.DataFrame  # config row name x experiment -> display text
    mean: pd.DataFrame  # score row name x experiment -> float
    std: pd.DataFrame  # same shape; NaN with a single run
    runs: pd.Series  # experiment -> number of runs (seeds)

    @property
    def experiments(self) -> list[str]:
        return list(self.mean.columns)

    def best(self, higher_is_better: bool = True) -> pd.DataFrame:
        """True at each score row's best experiment (by mean over seeds; ties all True), like `mean`'s shape."""
        best = self.mean.max(axis=1) if higher_is_better else self.mean.min(axis=1)
        return self.mean.eq(best, axis=0) & self.mean.notna()

    def cell(self, row: str, experiment: str, digits: int = 4) -> str:
        """A score cell as text: "0.7436", or "0.7436 ± 0.0050" with several seeds."""
        mean, std = self.mean.at[row, experiment], self.std.at[row, experiment]
        if pd.isna(mean):
            return "-"
        if self.runs[experiment] > 1 and not pd.isna(std):
            return f"{mean:.{digits}f} ± {std:.{digits}f}"
        return f"{mean:.{digits}f}"

    def to_frame(self, digits: int = 4) -> pd.DataFrame:
        """The whole table as text cells, like the paper (plus a `Runs` row)."""
        scores = pd.DataFrame(
            [[self.cell(r, e, digits) for e in self.experiments] for r in self.mean.index],
            index=self.mean.index,
            columns=self.experiments,
        )
        runs = pd.DataFrame([[str(int(self.runs[e])) for e in self.experiments]], index=["Runs"],
                            columns=self.experiments)
        frame = pd.concat([self.config, runs, scores])
        frame.index.name = "Experiment"
        return frame

    def _bold(self, bold_best: bool) -> pd.DataFrame:
        """Which cells of `to_frame` are bold: each score row's best experiment (none when not `bold_best`)."""
        frame = self.to_frame()
        bold = pd.DataFrame(False, index=frame.index, columns=frame.columns)
        if bold_best:
            bold.iloc[len(self.config) + 1:] = self.best().to_numpy()
        return bold

    def to_markdown(self, digits: int = 4, bold_best: bool = True) -> str:
        """A pipe table with a `Score` separator row as in the paper; each score row's best cell in bold."""
        frame = self.to_frame(digits)
        frame = frame.mask(self._bold(bold_best), "**" + frame + "**")
        head = frame.iloc[: len(self.config) + 1]
        score_row = pd.DataFrame([[""] * len(self.experiments)], index=["**Score**"], columns=self.experiments)
        return markdown_table(pd.concat([head, score_row, frame.iloc[len(self.config) + 1 :]]),
                              index_name="Experiment")

    def to_csv_frame(self) -> pd.DataFrame:
        """Columns `row`, then `<exp>` (config text or mean score) and `<exp>_std` per experiment."""
        out = {"row": [*self.config.index, "Runs", *self.mean.index]}
        for e in self.experiments:
            out[e] = [*self.config[e], int(self.runs[e]), *self.mean[e]]
            out[f"{e}_std"] = [None] * (len(self.config) + 1) + list(self.std[e])
        return pd.DataFrame(out)

    def to_latex(self, digits: int = 4, bold_best: bool = True) -> str:
        """A booktabs LaTeX tabular (\\usepackage{booktabs}): configuration rows, a rule, then the score rows,
        each score row's best cell in bold."""
        return latex_table(self.to_frame(digits), self._bold(bold_best), rules_before=(len(self.config) + 1,))

    def save(self, stem: str | os.PathLike) -> tuple[Path, Path, Path]:
        """Write `<stem>.md`, `<stem>.csv` and `<stem>.tex` atomically; return the three paths."""
        stem = Path(stem)
        md, csv, tex = (stem.with_name(stem.name + suffix) for suffix in (".md", ".csv", ".tex"))
        _write_text(md, self.to_markdown())
        with atomic_write(csv, "w") as fh:
            self.to_csv_frame().to_csv(fh, index=False)
        _write_text(tex, self.to_latex())
        return md, csv, tex


def experiment_table(
    logs: pd.DataFrame,
    experiments: list[str] | None = None,
    configs: dict[str, dict] | None = None,
    tasks: tuple[str, ...] | None = None,
    splits: tuple[str, ...] = ("test", "dev", "train"),
) -> ExperimentTable:
    """Rebuild one of tables 2-5 from run logs.

    Args:
        logs: rows from `read_logs`.
        experiments: columns, in order (default: every experiment in `logs`,
            sorted). Experiments without runs are left out.
        configs: run_dir -> experiment config (default: `read_configs(logs)`).
        tasks, splits: the score rows, in the paper's order (tasks default: the official Task A and B).

    Returns:
        An ExperimentTable; for each experiment the max score of each run
        (over all its evaluations) is averaged over the experiment's runs.
    """
    present = sorted(logs["experiment"].unique())
    experiments = [e for e in (experiments or present) if e in set(present)]
    if not experiments:
        raise MamikitError("no runs for the requested experiments")
    configs = read_configs(logs) if configs is None else configs
    maxes = run_max_scores(logs)
    tasks = official_task_names() if tasks is None else tasks
    rows = [(s, t, f"{SPLIT_NAMES.get(s, s + ' - ')}{t}") for s in splits for t in tasks]
    mean = pd.DataFrame(np.nan, index=[r[2] for r in rows], columns=experiments)
    std = mean.copy()
    runs = pd.Series(0, index=experiments, dtype=int)
    shown = {}
    for e in experiments:
        run_dirs = sorted(logs.loc[logs["experiment"] == e, "run_dir"].unique())
        runs[e] = len(run_dirs)
        shown[e] = next((config_display(configs[d]) for d in run_dirs if configs.get(d)), {})
    config = pd.DataFrame("", index=shown_rows(shown.values()), columns=experiments)
    for e in experiments:
        if shown[e]:
            config[e] = pd.Series(shown[e])
        for split, task, name in rows:
            vals = maxes.loc[(maxes["experiment"] == e) & (maxes["split"] == split) & (maxes["task"] == task), "max"]
            if len(vals):
                mean.at[name, e] = vals.mean()
                std.at[name, e] = vals.std(ddof=1) if len(vals) > 1 else np.nan
    config.index.name = mean.index.name = std.index.name = "Experiment"
    return ExperimentTable(config=config, mean=mean, std=std, runs=runs)


def markdown_table(frame: pd.DataFrame, index_name: str | None = None, index: bool = True) -> str:
    """A GitHub pipe table of a DataFrame's cells as text (no `tabulate` needed)."""

    def text(value) -> str:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return ""
        return str(value).replace("|", "\\|").replace("\n", " ")

    header = ([index_name or frame.index.name or ""] if index else []) + [text(c) for c in frame.columns]
    body = [([text(i)] if index else []) + [text(v) for v in row]
            for i, row in zip(frame.index, frame.itertuples(index=False))]
    widths = [max(3, *(len(r[k]) for r in [header, *body])) for k in range(len(header))]

    def line(cells):
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"

    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, body)])


def latex_table(frame: pd.DataFrame, bold: pd.DataFrame | None = None, index: bool = True,
                rules_before: tuple[int, ...] = ()) -> str:
    """A booktabs LaTeX tabular of a DataFrame's cells as text (pandas' Styler.to_latex).

    Args:
        frame: the cells; the index (headed by its name) is the first column unless `index` is False.
        bold: True where a cell is set in bold (\\bfseries), same shape as `frame`.
        index: show the index as the first column.
        rules_before: body row positions above which a \\midrule separates groups of rows.
    Returns:
        The tabular, text escaped for LaTeX and "±" written $\\pm$; needs \\usepackage{booktabs}.
    """
    frame = frame.astype(object).where(frame.notna(), "").astype(str)
    if index:
        frame.columns.name, frame.index.name = frame.index.name, None  # the index's name heads its column
    css = pd.DataFrame("", index=frame.index, columns=frame.columns)
    if bold is not None:
        css = css.mask(bold.to_numpy(bool), "bfseries: ;")
    styler = (frame.style.apply(lambda _: css, axis=None).format(escape="latex")
              .format_index(escape="latex", axis=0).format_index(escape="latex", axis=1))
    if not index:
        styler = styler.hide(axis="index")
    text = styler.to_latex(hrules=True, column_format=("l" if index else "") + "c" * frame.shape[1])
    lines = text.replace("±", r"$\pm$").splitlines()
    body = lines.index(r"\midrule") + 1  # the header is one line, ruled off below
    for position in sorted(set(rules_before), reverse=True):
        if 0 < position < len(frame):
            lines.insert(body + position, r"\midrule")
    return "\n".join(lines)


def _write_text(path: Path, text: str) -> Path:
    """Write `text` and a final newline to `path` atomically; return the path."""
    with atomic_write(path, "w") as fh:
        fh.write(text + "\n")
    return path


# ----------------------------------------------------------------------------- figure 5


def evaluation_scores(
    logs: pd.DataFrame,
    task: str,
    experiments: list[str] | None = None,
    split: str = "test",
    by: str = "experiment",
) -> pd.DataFrame:
    """Per-evaluation official scores of one task and split: columns `group`, `score` (figure 5).

    `by="experiment"` pools the seeds of an experiment into one group (named
    like the experiment); `by="run"` makes each run its own group
    ("02-seed0", or its folder when two runs share experiment and seed).
    Each score row also names its `experiment`, `seed` and `run` (folder).
    """
    if by not in ("experiment", "run"):
        raise MamikitError(f"by must be 'experiment' or 'run', not {by!r}")
    scores = official_scores(logs)
    scores = scores[(scores["task"] == task) & (scores["split"] == split) & scores["value"].notna()]
    if experiments is not None:
        scores = scores[scores["experiment"].isin(experiments)]
    scores = scores.sort_values(["experiment", "seed", "run", "step"], kind="stable")
    if by == "experiment":
        group = scores["experiment"]
    else:
        label = scores["experiment"] + "-seed" + scores["seed"].astype(str)
        n_runs = scores.groupby(label)["run_dir"].transform("nunique")
        group = label.where(n_runs == 1, scores["run"])
    return pd.DataFrame({"group": group.to_numpy(), "score": scores["value"].to_numpy(),
                         "experiment": scores["experiment"].to_numpy(), "seed": scores["seed"].to_numpy(),
                         "run": scores["run"].to_numpy()})


def pooled_evaluations(scores: pd.DataFrame) -> str:
    """What a figure 5 plot of `scores` pools, for its caption.

    E.g. "every evaluation of every seed, pooled per experiment (00: 8 evaluations of 1 seed; 01: 16
    evaluations of 2 seeds)", or "every evaluation, one group per run (01-seed0: 8 evaluations; ...)".
    """
    def count(n: int, noun: str) -> str:
        return f"{n} {noun}{'' if n == 1 else 's'}"

    per_experiment = bool((scores["group"].astype(str) == scores["experiment"].astype(str)).all())
    parts = []
    for group, rows in scores.groupby("group", sort=False):
        seeds = f" of {count(rows['seed'].nunique(), 'seed')}" if per_experiment and "seed" in rows else ""
        parts.append(f"{group}: {count(len(rows), 'evaluation')}{seeds}")
    how = "every evaluation of every seed, pooled per experiment" if per_experiment else \
        "every evaluation, one group per run"
    return f"{how} ({'; '.join(parts)})"


def box_caption(scores: pd.DataFrame, task: str, split: str = "test") -> str:
    """The caption of a figure 5 box plot: what is plotted and which evaluations it pools."""
    return (f"Box plots of the {task} score on the {split} split, one point per evaluation: "
            f"{pooled_evaluations(scores)}.")


def tukey_caption(scores: pd.DataFrame, task: str, split: str = "test", alpha: float = 0.05) -> str:
    """The caption of a Tukey HSD plot: the test, the intervals and the evaluations it pools."""
    level = int(round(100 * (1 - alpha)))
    return (f"Tukey's HSD on the {task} score on the {split} split: simultaneous {level}% intervals of each "
            "group's mean; blue the best mean, red the groups that differ significantly from it, grey those "
            f"that do not. Scores: {pooled_evaluations(scores)}.")


def tukey(scores: pd.DataFrame, alpha: float = 0.05):
    """Tukey's HSD over the groups of `evaluation_scores` (statsmodels pairwise_tukeyhsd).

    Raises MamikitError, saying why, when the test cannot be run: fewer than
    two groups, no residual degrees of freedom, or no variance at all.
    """
    from statsmodels.stats.multicomp import pairwise_tukeyhsd

    groups = scores["group"].unique()
    if len(groups) < 2:
        raise MamikitError(f"needs at least two groups, found {len(groups)} ({', '.join(map(str, groups)) or 'none'})")
    if len(scores) - len(groups) < 1:
        raise MamikitError(f"too few evaluations ({len(scores)} scores in {len(groups)} groups)")
    if scores.groupby("group")["score"].var(ddof=0).fillna(0).sum() == 0:
        raise MamikitError("every group has a constant score; nothing to compare")
    return pairwise_tukeyhsd(scores["score"].to_numpy(float), scores["group"].astype(str).to_numpy(), alpha=alpha)


def tukey_frame(result) -> pd.DataFrame:
    """A TukeyHSDResults as the summary table's columns (group1, group2, meandiff, p-adj, lower, upper, reject),
    unrounded."""
    return pd.DataFrame(
        {
            "group1": np.asarray(result.group_c, dtype=object),
            "group2": np.asarray(result.group_t, dtype=object),
            "meandiff": np.asarray(result.meandiffs, dtype=float),
            "p-adj": np.asarray(result.pvalues, dtype=float),
            "lower": np.asarray(result.confint, dtype=float)[:, 0],
            "upper": np.asarray(result.confint, dtype=float)[:, 1],
            "reject": np.asarray(result.reject, dtype=bool),
        }
    )


def tukey_text(frame: pd.DataFrame, digits: int = 4) -> pd.DataFrame:
    """A `tukey_frame` as text cells for Markdown and LaTeX: numbers rounded, reject as Yes/No."""
    out = frame.astype(object).copy()
    for col in ("meandiff", "p-adj", "lower", "upper"):
        out[col] = [f"{v:.{digits}f}" for v in frame[col]]
    out["reject"] = ["Yes" if r else "No" for r in frame["reject"]]
    return out


def save_tukey(frame: pd.DataFrame, stem: str | os.PathLike) -> list[Path]:
    """Write a `tukey_frame` as `<stem>.csv` (unrounded), `<stem>.md` and `<stem>.tex`; return the paths."""
    stem = Path(stem)
    csv, md, tex = (stem.with_name(stem.name + suffix) for suffix in (".csv", ".md", ".tex"))
    with atomic_write(csv, "w") as fh:
        frame.to_csv(fh, index=False)
    text = tukey_text(frame)
    return [csv, _write_text(md, markdown_table(text, index=False)), _write_text(tex, latex_table(text, index=False))]


def _tick_labels(groups: list[str], labels: dict | None, sep: str) -> list[str]:
    """The tick label of each group: `labels`' text, else (for a paper experiment) its registry label."""
    if labels is None:
        labels = experiment_labels([g for g in groups if g in EXPERIMENTS], sep=sep)
    return [labels.get(g, g) for g in groups]


def plot_tukey(result, title: str = "", score_name: str = "score", path=None, labels: dict | None = None):
    """Tukey simultaneous 95% intervals of the group means; the best group is the reference.

    Groups whose interval does not overlap the reference's are drawn red, others grey.

    Args:
        result: a `tukey` result.
        title, score_name: the title and the score's name (the x axis reads "mean <score_name> ...").
        path: also write `<stem>.png` and `<stem>.pdf` there.
        labels: group -> tick label (e.g. `group_labels`); default: a paper experiment's name with its
            description from the registry (`experiment_labels`), any other group its name.
    """
    from matplotlib.figure import Figure

    from matplotlib.lines import Line2D

    means = np.asarray(result._multicomp.groupstats.groupmean)
    groups = list(result.groupsunique)
    size = (6.4, 0.45 * len(groups) + 2.2)
    fig = Figure(figsize=size, dpi=120, layout="constrained")
    ax = fig.add_subplot()
    level = int(round(100 * (1 - result.alpha)))
    result.plot_simultaneous(comparison_name=groups[int(np.argmax(means))], ax=ax, figsize=size,
                             xlabel=f"mean {score_name} (simultaneous {level}% interval)", ylabel="group")
    names = [str(g) for g in groups]
    ax.set_yticks(range(len(names)), _tick_labels(names, labels, ": "), fontsize=8)
    ax.set_title(title or "Tukey HSD")
    ax.grid(axis="x", alpha=0.3)
    keys = [("b", "best mean (reference)"), ("r", "differs significantly"), ("0.5", "no significant difference")]
    fig.legend([Line2D([], [], color=c, marker="o") for c, _ in keys], [k for _, k in keys],
               loc="outside lower center", ncols=3, fontsize=7, frameon=False)
    save_figure(fig, path)
    return fig


def plot_box(scores: pd.DataFrame, title: str = "", score_name: str = "score", order: list[str] | None = None,
             path=None, labels: dict | None = None):
    """Box plots of the per-evaluation scores per group (figure 5), with the points overlaid.

    Args:
        scores: from `evaluation_scores`.
        title, score_name: the title and the y axis.
        order: the groups, left to right (default: as they come).
        path: also write `<stem>.png` and `<stem>.pdf` there.
        labels: group -> tick label (e.g. `group_labels` with the runs' recorded configurations); default: a
            paper experiment's name with its description from the registry, any other group its name.
    """
    import seaborn as sns
    from matplotlib.figure import Figure

    order = order or list(dict.fromkeys(scores["group"]))
    fig = Figure(figsize=(max(4.0, 1.1 * len(order) + 1.6), 4.2), dpi=120, layout="constrained")
    with sns.axes_style("whitegrid"):
        ax = fig.add_subplot()
    with warnings.catch_warnings():  # seaborn 0.13 passes matplotlib's deprecated `vert`
        warnings.filterwarnings("ignore", message=".*vert.*", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*vert.*", category=PendingDeprecationWarning)
        sns.boxplot(data=scores, x="group", y="score", order=order, ax=ax, color="#9ecae1", width=0.6, fliersize=0)
    sns.stripplot(data=scores, x="group", y="score", order=order, ax=ax, color="#08306b", size=3, alpha=0.6,
                  jitter=0.15)
    per_experiment = "experiment" not in scores or bool((scores["group"].astype(str)
                                                         == scores["experiment"].astype(str)).all())
    ticks = ["\n".join(textwrap.fill(line, 16) for line in label.split("\n"))  # about a box's width
             for label in _tick_labels([str(g) for g in order], labels, "\n")]
    ax.set_xticks(range(len(order)), ticks, fontsize=8)
    ax.set_xlabel("experiment" if per_experiment else "run")
    ax.set_ylabel(score_name)
    ax.set_title(title or score_name)
    save_figure(fig, path)
    return fig


# ----------------------------------------------------------------------------- figures 3-4


def pick_figure_run(logs: pd.DataFrame, configs: dict[str, dict] | None = None) -> str | None:
    """Run for figures 3-4: experiment 30 if present, else the best run with a decoder.

    Among candidates the run with the highest max dev score of the official Task A wins
    (test scores are what the tables report, so they do not pick the run).
    """
    configs = read_configs(logs) if configs is None else configs
    maxes = run_max_scores(logs)
    dev = maxes[(maxes["split"] == "dev") & (maxes["task"] == official_task_names()[0])].set_index("run_dir")["max"]
    runs = list(logs["run_dir"].unique())
    candidates = [d for d in runs if logs.loc[logs["run_dir"] == d, "experiment"].iloc[0] == "30"]
    if not candidates:
        candidates = [d for d in runs if configs.get(d, {}).get("pooling") not in (None, "cls")]
    if not candidates:
        return None
    return max(candidates, key=lambda d: (dev.get(d, -np.inf), d))


def figures_for_run(
    run_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    data_root: str | os.PathLike | None = None,
    features_root: str | os.PathLike | None = None,
    checkpoint: str = "best",
    device: str = "auto",
    seed: int = 0,
) -> list[Path]:
    """Figures 3 (t-SNE) and 4 (attention) of a trained run, on the primary dataset's (MAMI's) test set.

    Args:
        run_dir: a run directory with a checkpoint.
        out_dir: where the figures go (each as PNG and, beside it, PDF).
        data_root, features_root: default to the folders recorded in the run's config.json.
        checkpoint: "best" (best dev score of the official Task A) or "last".
        device: where to run the model.
        seed: t-SNE seed.

    Returns:
        figure3_tsne.png, figure4a_self_attention.png, figure4b_cross_attention.png in `out_dir`, each with
        its PDF beside it (`viz.figure_paths`). Raises (MamikitError or whatever stops the model) so the
        caller can say why.
    """
    from . import evaluation, runs, viz
    from .store import FeatureStore, store_dir

    loaded = runs.load_run(run_dir, checkpoint=checkpoint, device=device)
    store = FeatureStore(store_dir(features_root or loaded.config["features"], loaded.profile.name))
    splits = runs.prepare_data(loaded.experiment, data_root or loaded.config["data"], store)
    primary = primary_dataset()
    data = splits.get((primary, "test"))
    if data is None or len(data) == 0:
        raise MamikitError(f"{run_dir}: no {primary} test memes with features")
    out = evaluation.predict_split(loaded.model, loaded.experiment, data, device=loaded.device, return_attention=True)
    if "decoder_out" not in out:
        raise MamikitError(f"{run_dir}: experiment {loaded.experiment.name} has no decoder; figures 3-4 need one")
    views = viz.decoder_views(out["decoder_rows"])  # which decoder rows each figure reads
    labels = views["labels"]
    gold = np.full((len(data), len(labels)), -1.0)  # (N, C); -1 where the test set has no such label
    for k, label in enumerate(labels):
        if label in data.labels:
            gold[:, k] = data.targets[:, list(data.labels).index(label)]
    out_dir = Path(out_dir)
    paths = [out_dir / "figure3_tsne.png", out_dir / "figure4a_self_attention.png",
             out_dir / "figure4b_cross_attention.png"]
    decoded = np.asarray(out["decoder_out"])[:, [views["tsne_rows"][label] for label in labels]]  # (N, C, D)
    queries = np.asarray(out["queries"])[[out["labels"].index(label) for label in labels]]  # (C, D)
    viz.plot_tsne(decoded, queries, gold, labels, seed=seed, path=paths[0])
    rows = views["self_rows"]
    self_attn = np.asarray(out["self_attn"]).mean(0)[:, rows][:, :, rows]  # (layers, R, R) -> (layers, k, k)
    viz.plot_self_attention(self_attn, [out["decoder_rows"][i][1] for i in rows], path=paths[1])
    cross = np.asarray(out["cross_by_encoder"]).mean(0)  # (layers, R, E)
    cross = np.stack([cross[:, views["label_rows"][label]].mean(1) for label in labels], 1)  # (layers, C, E)
    viz.plot_cross_attention(cross, labels, out["encoders"], path=paths[2])
    return paths


# ----------------------------------------------------------------------------- report


def write_report(
    runs_root: str | os.PathLike,
    out_dir: str | os.PathLike,
    data_root: str | os.PathLike | None = None,
    features_root: str | os.PathLike | None = None,
    figures: bool = True,
    by: str = "experiment",
) -> list[Path]:
    """Tables 2-5, Tukey tables + plots, box plots and figures 3-4 for every run under `runs_root`.

    Per round: `table<k>_round<n>` (.md, .csv, .tex); per round and official task, where there are test
    scores, `box_round<n>_<task>` (.png, .pdf, .caption.txt) and, where Tukey's HSD can be run,
    `tukey_round<n>_<task>` (.csv, .md, .tex, .png, .pdf, .caption.txt); experiments of no round go to
    `table_other` and `*_other_*`. Figures 3-4 as `figure3_tsne`, `figure4a_self_attention` and
    `figure4b_cross_attention` (.png, .pdf). A caption says what its figure plots and which evaluations
    it pools; figures label the experiments with their names and recorded switches (`group_labels`).

    Args:
        runs_root: folder with the run directories (any depth, e.g. round1/02-seed0).
        out_dir: report folder (created).
        data_root, features_root: passed to `figures_for_run` (default: from the run config).
        figures: draw figures 3-4 (needs a trained model); failures are reported, not raised.
        by: Tukey / box groups, "experiment" (seeds pooled) or "run".

    Returns:
        The files written.
    """
    logs = read_logs(runs_root)
    if logs.empty:
        raise MamikitError(f"{runs_root}: no run logs (log.jsonl) found")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    configs = read_configs(logs)
    recorded = experiment_configs(logs, configs)
    present = set(logs["experiment"])
    rounds = {r: [e for e in exps if e in present] for r, exps in ROUNDS.items()}
    in_rounds = {e for exps in rounds.values() for e in exps}
    groups = [(f"table{ROUND_TABLES[r]}_round{r}", f"round{r}", exps) for r, exps in rounds.items() if exps]
    others = sorted(present - in_rounds)
    if others:
        groups.append(("table_other", "other", others))
    written: list[Path] = []
    for stem, name, exps in groups:
        log.info(f"{name}: experiments {', '.join(exps)}")
        written += experiment_table(logs, exps, configs).save(out / stem)
        for task in official_task_names():
            scores = evaluation_scores(logs, task, exps, split="test", by=by)
            order = [g for g in dict.fromkeys(scores["group"])]
            if scores.empty:
                log.info(f"  {task}: no test scores, box and Tukey skipped")
                continue
            stem = out / f"box_{name}_{task}"
            plot_box(scores, f"{name}: {task} on test, every evaluation", f"{task} score", order, path=stem,
                     labels=group_labels(scores, recorded, sep="\n"))
            written += [*figure_paths(stem), _write_text(stem.with_name(stem.name + ".caption.txt"),
                                                         box_caption(scores, task))]
            try:
                result = tukey(scores)
            except MamikitError as exc:
                log.info(f"  {task}: Tukey HSD skipped: {exc}")
                continue
            stem = out / f"tukey_{name}_{task}"
            written += save_tukey(tukey_frame(result), stem)
            plot_tukey(result, f"{name}: Tukey HSD, {task} on test", f"{task} score", path=stem,
                       labels=group_labels(scores, recorded))
            written += [*figure_paths(stem), _write_text(stem.with_name(stem.name + ".caption.txt"),
                                                         tukey_caption(scores, task, alpha=result.alpha))]
    if figures:
        run_dir = pick_figure_run(logs, configs)
        if run_dir is None:
            log.info("figures 3-4 skipped: no run with a decoder")
        else:
            log.info(f"figures 3-4 from {run_dir}")
            try:
                written += [f for png in figures_for_run(run_dir, out, data_root, features_root)
                            for f in figure_paths(png)]
            except Exception as exc:  # a report without figures 3-4 is still a report
                log.info(f"figures 3-4 skipped: {type(exc).__name__}: {exc}")
    for path in written:
        log.info(f"  wrote {path}")
    return written
