"""Rounds on Ray (section 5.1's rounds, many runs at once): every (experiment, seed) run a Ray task.

The sequential engine (`rounds.run_round`) and shards need nothing but a
shared folder; Ray spreads one round's runs over the CPUs or GPUs of a
machine or a cluster. A run's task skips, resumes and locks exactly as the
sequential engine does (`rounds` plans and runs it); this module only hands
the runs out and gathers their results.

A task whose worker process dies (killed, out of memory, a lost node) is run
again by Ray, up to `retries` times (the task's `max_retries`): the new
attempt resumes the run from its last checkpoint, so the run ends as if it had
never been interrupted. A run's own error (a damaged file, other settings) is
no reason to retry, since it would fail the same way: it comes back as a
"failed" result (`retry_exceptions` is off).
"""

from __future__ import annotations

import os
import time
import traceback
from pathlib import Path

from .provenance import RunLocked
from .rounds import RoundRun, RunResult, _locked, _resolve_runs, _skip, _train_one, run_dir_for
from .utils import MamikitError, get_logger

log = get_logger(__name__)

RETRIES = 3  # attempts after the first for a run whose worker process died


def _ray_task(run: RoundRun, data_root, features_root, runs_root, profile, train_overrides, threads: int,
              recipe: str = "paper", single_stage: bool = False) -> RunResult:
    """One run as a Ray task: torch threads matched to the CPUs Ray granted; failures come back as results."""
    import torch

    torch.set_num_threads(threads)
    t0 = time.time()
    try:
        return _train_one(run, data_root, features_root, runs_root, profile, train_overrides, False, recipe,
                          single_stage)
    except RunLocked as exc:
        return _locked(run, exc, time.time() - t0)
    except Exception as exc:  # noqa: BLE001 -- one run's failure is reported, the others go on
        last = traceback.format_exception_only(type(exc), exc)[-1].strip()
        return RunResult(run, run_dir_for(runs_root, run.round_no, run.experiment, run.seed), "failed",
                         time.time() - t0, last, os.getpid())


def run_round_ray(round_no: int, data_root, features_root, runs_root, profile="demo", seeds=(0,), train_overrides=None,
                  shard=None, address: str | None = None, num_cpus: int | None = None, recipe: str = "paper",
                  single_stage: bool = False, rerun_changed: bool = False, experiments=None,
                  retries: int = RETRIES) -> list[RunResult]:
    """Run a round with every (experiment, seed) run as a Ray task.

    Args:
        round_no, data_root, features_root, runs_root, profile, seeds, train_overrides, shard, recipe,
        single_stage, rerun_changed, experiments: as `run_round`.
        address: a running Ray cluster to join (`ray.init(address=...)`); None starts a local Ray.
        num_cpus: CPUs of the local Ray (default: all); ignored when joining a cluster.
        retries: how many times Ray runs a task again whose worker process died; each attempt resumes the
            run from its checkpoint. A run that was retried reports "resumed".
    Returns:
        One RunResult per run, in the round's order. With GPUs in the cluster each task asks for one GPU,
        otherwise for one CPU (and trains with one torch thread).
    """
    try:
        import ray
    except ImportError:
        raise MamikitError("--engine ray needs Ray: pip install 'mamikit[ray]' (or pip install ray)") from None
    runs = _resolve_runs(round_no, seeds, shard, experiments)
    results: dict[RoundRun, RunResult] = {}
    todo = []
    for run in runs:
        skipped = _skip(runs_root, run, profile, train_overrides, recipe, single_stage, rerun_changed)
        if skipped is None:
            todo.append(run)
        else:
            results[run] = skipped
    started_here = not ray.is_initialized()
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")  # evaluation lines of different runs look alike; keep each
    if todo and started_here:
        if address:
            ray.init(address=address, log_to_driver=True)
        else:
            ray.init(num_cpus=num_cpus or os.cpu_count(), include_dashboard=False, log_to_driver=True,
                     runtime_env={"env_vars": {"PYTHONPATH": _pythonpath()}})
    try:
        if todo:
            # --device cpu keeps the runs off the GPUs even where the cluster has some
            gpus = (ray.cluster_resources().get("GPU", 0)
                    if (train_overrides or {}).get("device", "auto") != "cpu" else 0)
            options = {"num_gpus": 1, "num_cpus": 1} if gpus else {"num_cpus": 1}
            # a dead worker is retried (the run resumes); an exception is the run's own and comes back as a result
            task = ray.remote(_ray_task).options(max_retries=retries, retry_exceptions=False, **options)
            futures = {task.remote(run, Path(data_root).resolve(), Path(features_root).resolve(),
                                   Path(runs_root).resolve(), profile, dict(train_overrides or {}), 1, recipe,
                                   single_stage): run for run in todo}
            log.info("round %s: %d runs as Ray tasks (%s each), %d already complete",
                     round_no, len(todo), "1 GPU" if gpus else "1 CPU", len(runs) - len(todo))
            pending = list(futures)
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                run = futures[done[0]]
                try:
                    results[run] = ray.get(done[0])
                except ray.exceptions.RayError as exc:  # the worker died (killed, out of memory) every attempt
                    results[run] = RunResult(run, run_dir_for(runs_root, round_no, run.experiment, run.seed), "failed",
                                             error=str(exc).strip().splitlines()[0])
                log.info("round %s: %s %s", round_no, run.name, results[run].state)
    finally:
        if todo and started_here:
            ray.shutdown()
    return [results[run] for run in runs]


def _pythonpath() -> str:
    """PYTHONPATH for local Ray workers: this mamikit first, so a checkout is imported, not another install."""
    here = str(Path(__file__).resolve().parents[1])
    return os.pathsep.join([here] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
