"""The four ablation rounds of section 5.1, run: every experiment of a round for every seed.

A round starts from the previous round's winner (`experiments.ROUNDS`), so a
complete run of that experiment from an earlier round is reused instead of
trained again. Runs land in `<runs_root>/round<N>/<experiment>-seed<k>`
(DESIGN.md "Run directory"). This module sits above the loop (`train`) and the
run directory (`runs`); the registry (`experiments`) stays free of both.
"""

from __future__ import annotations

from pathlib import Path

from .experiments import PAPER_EPOCHS, ROUNDS, get_experiment
from .runs import run_is_complete
from .train import TrainConfig, train
from .utils import MamikitError, get_logger

log = get_logger(__name__)


def run_dir_for(runs_root, round_no: int, name: str, seed: int) -> Path:
    """Where a round's run lives: `<runs_root>/round<N>/<experiment>-seed<k>` (DESIGN.md)."""
    return Path(runs_root) / f"round{round_no}" / f"{name}-seed{seed}"


def run_round(round_no: int, data_root, features_root, runs_root, profile="demo", seeds=(0,), train_overrides=None, progress=True,
              recipe: str = "paper") -> list[Path]:
    """Train every experiment of a round for every seed, skipping runs already complete.

    Args:
        round_no: 1-4 (section 5.1.1-5.1.4).
        data_root: data folder (MAMI/, FBHM/).
        features_root: feature store written by `extract`.
        runs_root: runs root; runs land in `round<N>/<exp>-seed<k>`.
        profile: profile name or Profile.
        seeds: seeds to run per experiment.
        train_overrides: TrainConfig fields to set (e.g. evals_per_epoch); `epochs` is the count for a
            15-epoch experiment and scales with the experiment (experiment 30 gets twice as many).
        progress: show progress bars.
        recipe: the experiments' recipe, "paper" or "authors" (`experiments.recipe_switches`).
    Returns:
        The run directories, in order.
    """
    if round_no not in ROUNDS:
        raise MamikitError(f"unknown round {round_no}; rounds are {sorted(ROUNDS)}")
    train_overrides = dict(train_overrides or {})
    dirs = []
    for name in ROUNDS[round_no]:
        for seed in seeds:
            out = run_dir_for(runs_root, round_no, name, seed)
            # A round starts from the previous winner: reuse its complete run from an earlier round.
            done = [d for d in sorted(Path(runs_root).glob(f"round*/{name}-seed{seed}")) if run_is_complete(d)]
            if done:
                log.info("round %s: experiment %s seed %s is complete in %s, reused", round_no, name, seed, done[0])
                dirs.append(done[0])
                continue
            settings = dict(train_overrides)
            if settings.get("epochs"):
                # Keep the paper's ratios when the epochs are scaled down: experiment 30 trains twice as long.
                settings["epochs"] = max(1, round(settings["epochs"] * get_experiment(name).epochs / PAPER_EPOCHS))
            cfg = TrainConfig(seed=seed, **settings)
            # resume=True continues an interrupted run and starts a fresh one otherwise
            train(get_experiment(name, recipe=recipe), data_root, features_root, out, profile=profile, train_cfg=cfg, resume=True, progress=progress)
            dirs.append(out)
    return dirs


def cli_round(args) -> int:
    """`python -m mamikit round`: run one round for the given seeds."""
    from .profiles import get_profile

    profile = get_profile(args.profile, clip_model=args.clip_model, clip_pretrained=args.clip_pretrained, detr_model=args.detr_model, text_model=args.text_model)
    overrides = {"device": args.device}
    for field in ("epochs", "evals_per_epoch", "accumulation", "lr"):
        if getattr(args, field, None) is not None:
            overrides[field] = getattr(args, field)
    seeds = [int(s) for s in str(args.seeds).split(",") if s.strip()]
    run_round(args.round, args.data, args.features, args.out, profile=profile, seeds=seeds, train_overrides=overrides,
              recipe=getattr(args, "recipe", "paper"))
    return 0
