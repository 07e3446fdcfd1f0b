"""The four ablation rounds of section 5.1, run: every experiment of a round for every seed.

A round starts from the previous round's winner (`experiments.ROUNDS`), so a
complete run of that experiment from an earlier round is reused instead of
trained again. Runs land in `<runs_root>/round<N>/<experiment>-seed<k>`
(docs/design.md "Run directory"). This module sits above the loop (`train`) and the
run directory (`runs`); the registry (`experiments`) stays free of both.

A round's runs can be spread over workers in two ways. `shard` splits them
deterministically over N independent workers (Colab sessions, a Slurm array):
no coordination, no lock needed. `ray_engine.run_round_ray` makes every run a Ray task,
placed by Ray's scheduler on a machine's GPUs/CPUs or a cluster's. Either way
each run directory is locked while it trains (mamikit.provenance), so two
workers never train the same run; the second reports the holder and moves on.

A complete run is reused (or skipped) only when the settings it recorded in
config.json -- experiment with its recipe and switches, training values,
profile -- are the ones asked for now; otherwise the round names the settings
that differ and leaves the run alone unless told to train it again
(`rerun_changed`). Round 4 trains experiment 30 as the authors did (section
5.1.4, docs/fidelity.md row 3): a 15-epoch run (`30-stage1-seed<k>`) that a
second run (`30-seed<k>`) continues for 15 more epochs from its weights, with
a fresh optimiser and schedule.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from .checkpoints import STAGED, settle_staged
from .experiments import FUTURE_EXPERIMENTS, PAPER_EPOCHS, ROUNDS, Experiment, get_experiment
from .provenance import HOLDER_FILE, LOCK_FILE, RunLock, RunLocked, describe_holder, lock_holder
from .runs import CONFIG_FILE, LOG_FILE, recorded_values, run_is_complete
from .train import TrainConfig, run_settings, train
from .utils import MamikitError, get_logger, progress_view, read_json

log = get_logger(__name__)


@dataclass(frozen=True)
class RoundRun:
    """One run of a round: an experiment with one seed."""

    round_no: int  # 1-4 (section 5.1.1-5.1.4), 5 (section 6's future work)
    experiment: str  # the paper's experiment name ("00" ... "30")
    seed: int  # TrainConfig.seed

    @property
    def name(self) -> str:
        """`<experiment>-seed<k>`, the run directory's name."""
        return f"{self.experiment}-seed{self.seed}"


@dataclass(frozen=True)
class RunResult:
    """What became of one run when a round was run (a row of the summary table)."""

    run: RoundRun  # which run
    run_dir: Path  # where it lives (an earlier round's directory when reused)
    # "trained", "resumed", "complete" (already), "reused", "locked" (another worker has it), "failed" or
    # "changed" (recorded with other settings, left alone; `error` names them)
    state: str
    seconds: float = 0.0  # wall time spent on it here
    error: str = ""  # the failure or the lock holder
    pid: int | None = None  # the process that trained it


class RunDirs(list):
    """The run directories a round (or one experiment's cell) did or reused: a list of Paths that a notebook
    shows as a table of its runs (`table`)."""

    def __init__(self, dirs=(), results: list | None = None):
        super().__init__(dirs)
        # every run's outcome, those left out of the list too (the caller's list, when given, is filled in place)
        self.results: list[RunResult] = [] if results is None else results

    def table(self) -> pd.DataFrame:
        """One row per run: where it is, its state, its best dev and test score per official task, seconds."""
        import pandas as pd

        from .analysis import read_logs, run_max_scores
        from .registry import official_task_names

        rows = []
        for r in self.results:
            best = {}
            if (r.run_dir / LOG_FILE).is_file():
                scores = run_max_scores(read_logs(r.run_dir))
                best = {(split, task): round(float(v), 4)
                        for split, task, v in zip(scores["split"], scores["task"], scores["max"])}
            rows.append({"run": f"{r.run_dir.parent.name}/{r.run_dir.name}", "state": r.state,
                         **{f"best {split} {task}": best.get((split, task))
                            for split in ("dev", "test") for task in official_task_names()},
                         "seconds": round(r.seconds, 1), "error": r.error})
        table = pd.DataFrame(rows)
        return table.drop(columns="error") if len(table) and not table["error"].any() else table

    def _repr_html_(self) -> str:
        return self.table().to_html(index=False, na_rep="", float_format=lambda v: f"{v:.4g}")

    def _repr_pretty_(self, printer, cycle) -> None:
        printer.text(self.table().to_string(index=False, na_rep=""))


def run_dir_for(runs_root, round_no: int, name: str, seed: int) -> Path:
    """Where a round's run lives: `<runs_root>/round<N>/<experiment>-seed<k>` (docs/design.md "Run directory")."""
    return Path(runs_root) / f"round{round_no}" / f"{name}-seed{seed}"


def round_runs(round_no: int, seeds=(0,)) -> list[RoundRun]:
    """A round's runs in their fixed order: experiments as in ROUNDS, each over the sorted seeds."""
    if round_no not in ROUNDS:
        raise MamikitError(f"unknown round {round_no}; rounds are {sorted(ROUNDS)}")
    seeds = sorted({int(s) for s in seeds})
    return [RoundRun(round_no, name, seed) for name in ROUNDS[round_no] for seed in seeds]


def parse_shard(text: str) -> tuple[int, int]:
    """`k/N` -> (k, N) with 0 <= k < N (k as Slurm's 0-based SLURM_ARRAY_TASK_ID)."""
    try:
        k, n = (int(part) for part in str(text).split("/"))
    except ValueError:
        raise MamikitError(f"--shard {text!r}: expected k/N, e.g. 0/4 for the first of 4 workers") from None
    if n < 1:
        raise MamikitError(f"--shard {text!r}: N (the number of workers) must be at least 1")
    if not 0 <= k < n:
        raise MamikitError(f"--shard {text!r}: k is 0-based, in 0..{n - 1} for N = {n}; "
                           f"with a 1-based array index pass $((SLURM_ARRAY_TASK_ID - 1))/{n}")
    return k, n


def shard(runs: list, k: int, n: int) -> list:
    """Worker k's share of `runs` out of n: every n-th run from the k-th, so sizes differ by at most one.

    Striding, not cutting into blocks, also spreads each experiment's seeds
    (and the long experiment 30) over the workers.
    """
    if n < 1 or not 0 <= k < n:
        raise MamikitError(f"shard {k}/{n}: k must be in 0..{n - 1}")
    return runs[k::n]


@dataclass(frozen=True)
class Stage:
    """One training of a round's run: where it goes and what it trains."""

    run_dir: Path  # its run directory
    experiment: Experiment  # what it trains (recipe applied)
    train_cfg: TrainConfig  # how (seed, epochs, init_from, ...)

    def settings(self, profile) -> dict:
        """The settings this training records in config.json (`train.run_settings`)."""
        return run_settings(self.experiment, profile, self.train_cfg)


STAGE1 = "-stage1"  # suffix of the first 15 epochs of experiment 30 in round 4 (docs/fidelity.md row 3)


def two_stage(run: RoundRun, single_stage: bool = False) -> bool:
    """Whether a run trains as 15 epochs continued for 15 (docs/fidelity.md row 3): experiment 30 in rounds 4
    and 5, and every experiment of round 5 (each is 30 with one change, trained as 30 is)."""
    if single_stage or run.round_no < 4:
        return False
    return run.experiment == "30" or run.experiment in FUTURE_EXPERIMENTS


def plan(run: RoundRun, runs_root, train_overrides=None, recipe: str = "paper",
         single_stage: bool = False) -> list[Stage]:
    """The trainings a run consists of, in order: one, or experiment 30's first stage and its continuation.

    `train_overrides["epochs"]` is the count of a 15-epoch experiment: experiment 30 trains
    twice as long (as one schedule, or as two stages of that count).
    """
    settings = dict(train_overrides or {})
    experiment = get_experiment(run.experiment, recipe=recipe)
    epochs = settings.pop("epochs", None)
    total = max(1, round(epochs * experiment.epochs / PAPER_EPOCHS)) if epochs else experiment.epochs
    out = run_dir_for(runs_root, run.round_no, run.experiment, run.seed)
    if not two_stage(run, single_stage):
        return [Stage(out, experiment, TrainConfig(seed=run.seed, epochs=total if epochs else None, **settings))]
    half = max(1, total // 2)
    first = run_dir_for(runs_root, run.round_no, run.experiment + STAGE1, run.seed)
    # The second stage starts from the first's last weights, so the first keeps them; under the default
    # "best" it keeps only them (its best model is no reported result). "last", "best+last", "all" keep last already.
    wanted = settings.get("keep_weights", "best")
    keep = "last" if wanted == "best" else wanted
    return [Stage(first, dataclasses.replace(experiment, name=run.experiment + STAGE1),
                  TrainConfig(seed=run.seed, epochs=half, **dict(settings, keep_weights=keep))),
            Stage(out, experiment, TrainConfig(seed=run.seed, epochs=half, init_from=str(first.resolve()),
                                               **settings))]


IGNORED = {"train": ("device", "eval_batch_size")}  # how a run was computed, not what it is


def _same(a, b, key: str = "") -> bool:
    """Equal settings values; paths compare by their last three parts (a runs folder copied elsewhere stays valid).

    `init_from` compares by its run folder's name alone: experiment 30's second stage in round 5 starts from
    round 5's first stage, equal to round 4's when their settings are (round 5 then reuses round 4's run).
    """
    if isinstance(a, str) and isinstance(b, str) and a.startswith("/") and b.startswith("/"):
        parts = 1 if key == "init_from" else 3
        return Path(a).parts[-parts:] == Path(b).parts[-parts:]
    return a == b


def settings_differences(run_dir, wanted: dict) -> list[str]:
    """The settings (`section.key`) a run's config.json records otherwise than `wanted`; [] when they match."""
    try:
        recorded = read_json(Path(run_dir) / CONFIG_FILE)
    except MamikitError:
        return ["config.json"]  # missing or unreadable: nothing says how the run was made
    if not isinstance(recorded, dict):
        return ["config.json"]
    out = []
    for section, new in wanted.items():
        old, new = recorded_values(section, recorded.get(section)), recorded_values(section, new)
        out += [f"{section}.{key}" for key in sorted(set(old) | set(new))
                if key not in IGNORED.get(section, ()) and not _same(old.get(key), new.get(key), key)]
    # the recipe first, then training and profile values: a changed recipe also changes several switches
    return sorted(out, key=lambda k: (k != "experiment.recipe", k.startswith("experiment."), k))


def _as_profile(profile):
    from .profiles import Profile, get_profile

    return profile if isinstance(profile, Profile) else get_profile(str(profile))


def reused_run(runs_root, run: RoundRun, wanted: dict | None = None) -> Path | None:
    """A complete run of the same experiment and seed from an earlier round (with the `wanted` settings), if any."""
    for d in sorted(Path(runs_root).glob(f"round*/{run.name}")):
        if d.parent.name != f"round{run.round_no}" and run_is_complete(d):
            if wanted is None or not settings_differences(d, wanted):
                return d
            log.info("%s: complete, but trained with other settings (%s); not reused",
                     d, ", ".join(settings_differences(d, wanted)[:6]))
    return None


def _changed(stages: list[Stage], profile) -> dict[Path, list[str]]:
    """The stages' run directories that hold a run (complete or not) recorded with other settings."""
    out = {}
    for stage in stages:
        if _readable_config(stage.run_dir):  # an unreadable one is train's to report, naming the file
            diff = settings_differences(stage.run_dir, stage.settings(profile))
            if diff:
                out[stage.run_dir] = diff
    return out


def _readable_config(run_dir: Path) -> bool:
    """Whether the run directory holds a config.json that is a JSON object."""
    try:
        return isinstance(read_json(Path(run_dir) / CONFIG_FILE), dict)
    except MamikitError:
        return False


def _describe(changed: dict[Path, list[str]]) -> str:
    return "; ".join(f"{d.name}: {', '.join(keys[:6])}{' ...' if len(keys) > 6 else ''}"
                     for d, keys in changed.items())


def run_state(runs_root, run: RoundRun, profile=None, train_overrides=None, recipe: str = "paper",
              single_stage: bool = False) -> str:
    """`complete`, `complete in roundN` (reused), `interrupted` or `not started`; `, locked by ...` when held.

    With a `profile`, runs recorded with other settings than these say `, settings differ: ...`.
    """
    stages = plan(run, runs_root, train_overrides, recipe, single_stage)
    out = stages[-1].run_dir
    wanted = stages[-1].settings(_as_profile(profile)) if profile is not None else None
    reused = reused_run(runs_root, run, wanted)
    if run_is_complete(out):
        state = "complete"
    elif reused is not None:
        state = f"complete in {reused.parent.name}"
    elif any((s.run_dir / CONFIG_FILE).exists() or (s.run_dir / LOG_FILE).exists()
             or (s.run_dir / "checkpoints").exists() for s in stages):
        state = "interrupted"
    else:
        state = "not started"
    changed = _changed(stages, _as_profile(profile)) if profile is not None else {}
    if changed:
        state += f", settings differ: {_describe(changed)}"
    holder = lock_holder(out)
    return state + (f", locked by {describe_holder(holder)}" if holder else "")


def _train_one(run: RoundRun, data_root, features_root, runs_root, profile, train_overrides, progress,
               recipe: str = "paper", single_stage: bool = False) -> RunResult:
    """Train (or resume) one run, stage by stage; RunLocked when another worker holds it.

    "complete" when every stage was found finished under its lock (another worker finished it since the round looked).
    """
    stages = plan(run, runs_root, train_overrides, recipe, single_stage)
    started = any((s.run_dir / CONFIG_FILE).exists() for s in stages)
    t0 = time.time()
    modes = []
    for stage in stages:
        # resume=True continues an interrupted run, starts a fresh one otherwise, and returns a complete one at once
        outcome = {}
        train(stage.experiment, data_root, features_root, stage.run_dir, profile=profile, train_cfg=stage.train_cfg,
              resume=True, progress=progress, outcome=outcome)
        modes.append(outcome.get("mode"))
    if all(mode == "complete" for mode in modes):
        return RunResult(run, stages[-1].run_dir, "complete", time.time() - t0)
    return RunResult(run, stages[-1].run_dir, "resumed" if started else "trained", time.time() - t0, pid=os.getpid())


def _skip(runs_root, run: RoundRun, profile="demo", train_overrides=None, recipe: str = "paper",
          single_stage: bool = False, rerun_changed: bool = False) -> RunResult | None:
    """The result of a run that needs no training (complete here, reusable, or changed and left alone); None: train it.

    A run of this round recorded with other settings is "changed" and left as it is, unless
    `rerun_changed`: then its directory is emptied under its lock (`clear_changed`) and it is trained again.
    """
    profile = _as_profile(profile)
    stages = plan(run, runs_root, train_overrides, recipe, single_stage)
    out = stages[-1].run_dir
    changed = _changed(stages, profile)
    if changed and not rerun_changed:
        return RunResult(run, out, "changed", error=f"settings differ: {_describe(changed)}")
    for stage in stages:
        if stage.run_dir in changed:
            try:
                clear_changed(stage.run_dir, stage.settings(profile))
            except RunLocked as exc:
                return _locked(run, exc)
    if run_is_complete(out):
        if (out / "checkpoints" / STAGED).is_dir():  # a finish killed between its `last` and its bests
            try:
                with RunLock(out):
                    settle_staged(out / "checkpoints")
            except RunLocked as exc:
                return _locked(run, exc)
        return RunResult(run, out, "complete")
    reused = reused_run(runs_root, run, stages[-1].settings(profile))
    return RunResult(run, reused, "reused") if reused else None


def clear_changed(run_dir: Path, wanted: dict) -> bool:
    """Empty a run directory recorded with other settings than `wanted`, holding its lock; whether it was emptied.

    The lock is taken first (RunLocked when another worker has it), because a
    worker that has just taken it may not have written its `.lock.json` yet,
    and the settings are compared again under it: another worker may have
    retrained the run with `wanted` since the round looked. The lock file
    itself stays, so that a worker waiting on it and one arriving later lock
    the same file.
    """
    with RunLock(run_dir):
        diff = settings_differences(run_dir, wanted) if _readable_config(run_dir) else []
        if not diff:
            return False
        log.warning("%s: trained with other settings (%s); emptied to train it again", run_dir, ", ".join(diff[:6]))
        for entry in run_dir.iterdir():
            if entry.name in (LOCK_FILE, HOLDER_FILE):
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
    return True


def _locked(run: RoundRun, exc: RunLocked, seconds: float = 0.0) -> RunResult:
    return RunResult(run, exc.run_dir, "locked", seconds, f"locked by {describe_holder(exc.holder)}")


def _resolve_runs(round_no, seeds, shard_spec, experiments=None) -> list[RoundRun]:
    """The runs to do: the round's, narrowed to `experiments` (names of this round; None: all), then the shard's."""
    runs = round_runs(round_no, seeds)
    if experiments is not None:
        wanted = [str(e) for e in ([experiments] if isinstance(experiments, str) else experiments)]
        unknown = [e for e in wanted if e not in ROUNDS[round_no]]
        if unknown:
            raise MamikitError(f"experiment {unknown[0]} is not in round {round_no}; "
                               f"its experiments are {', '.join(ROUNDS[round_no])}")
        runs = [r for r in runs if r.experiment in wanted]  # "30" of round 4 keeps both of its stages (`plan`)
    if shard_spec is not None:
        k, n = parse_shard(shard_spec) if isinstance(shard_spec, str) else shard_spec
        runs = shard(runs, k, n)
    return runs


def run_round(round_no: int, data_root, features_root, runs_root, profile="demo", seeds=(0,), train_overrides=None,
              progress=True, shard=None, results: list | None = None, recipe: str = "paper",
              single_stage: bool = False, rerun_changed: bool = False, experiments=None) -> RunDirs:
    """Train every experiment of a round for every seed, skipping runs already complete.

    Args:
        round_no: 1-4 (section 5.1.1-5.1.4) or 5 (section 6's future work, table 6).
        data_root: data folder (MAMI/, FBHM/).
        features_root: feature store written by `extract`.
        runs_root: runs root; runs land in `round<N>/<exp>-seed<k>`.
        profile: profile name or Profile.
        seeds: seeds to run per experiment.
        train_overrides: TrainConfig fields to set (e.g. evals_per_epoch); `epochs` is the count for a
            15-epoch experiment and scales with the experiment (experiment 30 gets twice as many).
        progress: show progress bars.
        recipe: the experiments' recipe, "paper" or "authors" (`experiments.recipe_switches`).
        shard: "k/N" or (k, N): only worker k's share of the runs (`shard`), k in 0..N-1.
        results: a list to append each run's RunResult to (the CLI's summary table).
        single_stage: round 4 trains experiment 30 on one 30-epoch schedule instead of 15 epochs continued for 15.
        rerun_changed: train again (replacing them) this round's runs recorded with other settings;
            without it they are reported as "changed" and left alone.
        experiments: only these experiments of the round (e.g. ["00"]; None: all); a notebook runs one per cell.
    Returns:
        The run directories done or reused, in order (runs another worker holds or that changed are left out),
        as a `RunDirs` list: a notebook shows it as a table of the runs and their best scores.
    """
    from tqdm.auto import tqdm

    dirs = RunDirs(results=results)  # each result goes into `results` as it comes
    runs = _resolve_runs(round_no, seeds, shard, experiments)
    bar = tqdm(total=len(runs), desc=f"round {round_no}", unit="run", disable=not progress)
    # with a bar, info messages (each evaluation's scores) replace one another on the bar's line
    with progress_view(bar.set_postfix_str) if progress else contextlib.nullcontext():
        _run_all(runs, round_no, data_root, features_root, runs_root, profile, train_overrides, progress, recipe,
                 single_stage, rerun_changed, bar, dirs)
    bar.close()
    return dirs


def _run_all(runs, round_no, data_root, features_root, runs_root, profile, train_overrides, progress, recipe,
             single_stage, rerun_changed, bar, dirs: RunDirs) -> None:
    """run_round's loop: each run skipped, reused or trained, its result added to `dirs`."""
    for run in runs:
        bar.set_postfix_str(run.name)
        result = _skip(runs_root, run, profile, train_overrides, recipe, single_stage, rerun_changed)
        if result is not None and result.state == "changed":
            log.warning("round %s: %s left alone, %s (rerun_changed / --rerun-changed trains it again)",
                        round_no, run.name, result.error)
        if result is not None and result.state == "reused":
            log.info("round %s: experiment %s seed %s is complete in %s, reused", round_no, run.experiment,
                     run.seed, result.run_dir)
        if result is None:
            try:
                result = _train_one(run, data_root, features_root, runs_root, profile, train_overrides, progress,
                                    recipe, single_stage)
            except RunLocked as exc:
                result = _locked(run, exc)
                log.warning("round %s: %s skipped: %s", round_no, run.name, result.error)
        dirs.results.append(result)
        if result.state not in ("locked", "changed"):
            dirs.append(result.run_dir)
        if result.state in ("trained", "resumed"):
            bar.update(1)
        else:  # complete, reused or locked: left out of the count, so the ETA is over runs trained here
            bar.total -= 1
            bar.refresh()


def run_experiment(experiment: str, settings, round_no: int | None = None, **options) -> RunDirs:
    """One experiment of a round for every seed of `settings` (a `mamikit.Settings`): a round notebook's cell.

    Args:
        experiment: the paper's name ("00" ... "30"); experiment 30 of round 4 trains both of its stages.
        settings: paths, profile, seeds, recipe and training values (`mamikit.load_settings`).
        round_no: the round it belongs to; needed only for an experiment of several rounds (02, 10).
        **options: further `run_round` arguments (progress, shard, single_stage, rerun_changed, results).
    Returns:
        `run_round`'s run directories (`RunDirs`: the cell shows a table of the runs, their state, best dev and
        test scores of the official tasks and seconds).
    """
    experiment = str(experiment)
    rounds = [r for r, names in ROUNDS.items() if experiment in names]
    if round_no is None:
        if not rounds:
            raise MamikitError(f"experiment {experiment} is in no round; the rounds are {ROUNDS}")
        if len(rounds) > 1:
            raise MamikitError(f"experiment {experiment} is in rounds {rounds}; say which with round_no=")
        round_no = rounds[0]
    return run_round(round_no, settings.data_root, settings.features_root, settings.runs,
                     profile=settings.get_profile(), seeds=settings.seeds,
                     train_overrides=settings.train_overrides(), recipe=settings.recipe,
                     experiments=[experiment], **options)


def round_status(round_no: int, settings) -> pd.DataFrame:
    """A round's experiments as tables 2-5 describe them, with each run's state (`run_state`) under these settings."""
    import pandas as pd

    columns = {}
    for name in ROUNDS[round_no]:
        column = get_experiment(name, recipe=settings.recipe).display()
        for seed in settings.seeds:
            column[f"seed {seed}"] = run_state(settings.runs, RoundRun(round_no, name, seed), settings.get_profile(),
                                               settings.train_overrides(), settings.recipe)
        columns[name] = column
    return pd.DataFrame(columns).rename_axis("Experiment")


# ----------------------------------------------------------------------------- what a round did


def summary_table(results: list[RunResult]) -> str:
    """The runs of a round as a plain-text table: run, state, seconds, error."""
    rows = [(f"round{r.run.round_no}/{r.run.name}", r.state, f"{r.seconds:.1f}", r.error) for r in results]
    head = ("run", "state", "seconds", "error")
    widths = [max(len(row[i]) for row in [head, *rows]) for i in range(3)]
    return "\n".join(f"{a:<{widths[0]}}  {b:<{widths[1]}}  {c:>{widths[2]}}  {d}".rstrip()
                     for a, b, c, d in [head, *rows])
