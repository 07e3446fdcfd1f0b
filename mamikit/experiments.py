"""The paper's experiments (tables 2-5) by name, and its four ablation rounds (section 5.1).

Each experiment is a frozen :class:`Experiment` whose fields are the switches of
section 5.1: `xformer_enc`, `pooling`, `proj_align`, `contrastive`,
`multi_task`, `backbones`. Vary one with :func:`get_experiment` overrides or
`dataclasses.replace`, which both reject unknown fields.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from .utils import MamikitError

XFORMER_ENCS = ("shared", "multi")
POOLINGS = ("cls", "none", "txt_cls")
BACKBONES = ("clip", "detr")

# How the paper's tables print each switch value.
DISPLAY = {
    "xformer_enc": {"shared": "Shared", "multi": "Multi"},
    "pooling": {"cls": "[CLS]", "none": "No", "txt_cls": "txt [CLS]"},
    "bool": {True: "Yes", False: "No"},
    "backbones": {("clip", "detr"): "CLIP and DETR", ("clip",): "CLIP", ("detr",): "DETR"},
}


@dataclass(frozen=True)
class Experiment:
    """One system configuration of section 5.1."""

    name: str  # the paper's experiment id, e.g. "30"
    xformer_enc: str  # "shared" (figure 1a) or "multi" (figure 1b) transformer encoders
    pooling: str  # "cls" (multi-head MLP), "none" or "txt_cls" (decoder + single-head MLP)
    proj_align: bool  # token encoding projection alignment loss, eq. 2
    contrastive: bool  # contrastive embedding loss, eq. 3-4
    multi_task: bool  # also learn from Facebook Hateful Memes (section 3.4)
    backbones: tuple[str, ...]  # image encoders: ("clip",), ("detr",) or ("clip", "detr")
    epochs: int = 15  # training epochs (experiment 30: 30)

    def __post_init__(self):
        if self.xformer_enc not in XFORMER_ENCS:
            raise MamikitError(f"experiment {self.name}: xformer_enc must be one of {XFORMER_ENCS}, got {self.xformer_enc!r}")
        if self.pooling not in POOLINGS:
            raise MamikitError(f"experiment {self.name}: pooling must be one of {POOLINGS}, got {self.pooling!r}")
        if self.pooling == "cls" and self.xformer_enc != "shared":
            raise MamikitError(f"experiment {self.name}: pooling 'cls' needs the shared encoder (section 3.3)")
        if self.pooling == "txt_cls" and self.xformer_enc != "multi":
            raise MamikitError(f"experiment {self.name}: pooling 'txt_cls' needs multi encoders (section 5.1)")
        backbones = tuple(self.backbones)
        if not backbones or any(b not in BACKBONES for b in backbones) or len(set(backbones)) != len(backbones):
            raise MamikitError(f"experiment {self.name}: backbones must be a non-empty subset of {BACKBONES}, got {self.backbones!r}")
        # Canonical order so ("detr", "clip") and ("clip", "detr") are the same experiment.
        object.__setattr__(self, "backbones", tuple(b for b in BACKBONES if b in backbones))
        if self.epochs < 1:
            raise MamikitError(f"experiment {self.name}: epochs must be positive")

    @property
    def datasets(self) -> tuple[str, ...]:
        """Datasets trained on: MAMI, plus FBHM when multi-task (table 1)."""
        return ("MAMI", "FBHM") if self.multi_task else ("MAMI",)

    @property
    def uses_decoder(self) -> bool:
        """Whether classification goes through the class-query decoder (figure 2b)."""
        return self.pooling != "cls"

    def display(self) -> dict[str, str]:
        """The configuration rows as the paper's tables print them."""
        return {
            "Xformer Enc": DISPLAY["xformer_enc"][self.xformer_enc],
            "Pooling": DISPLAY["pooling"][self.pooling],
            "Proj Algn": DISPLAY["bool"][self.proj_align],
            "Contrastive": DISPLAY["bool"][self.contrastive],
            "Multi-task": DISPLAY["bool"][self.multi_task],
            "Backbones": DISPLAY["backbones"][self.backbones],
        }


def _exp(name, xformer_enc, pooling, proj_align=False, contrastive=False, multi_task=False, backbones=("clip", "detr"), epochs=15):
    return Experiment(name, xformer_enc, pooling, proj_align, contrastive, multi_task, tuple(backbones), epochs)


PAPER_EXPERIMENTS: dict[str, Experiment] = {
    e.name: e
    for e in [
        # Round 1 (table 2): encoder variant and pooling.
        _exp("00", "shared", "cls"),
        _exp("01", "shared", "none"),
        _exp("02", "multi", "none"),
        _exp("03", "multi", "txt_cls"),
        # Round 2 (table 3): auxiliary objectives on the round-1 winner (02).
        _exp("10", "multi", "none", proj_align=True),
        _exp("12", "multi", "none", contrastive=True),
        _exp("13", "multi", "none", proj_align=True, contrastive=True),
        # Round 3 (table 4): image backbones on the round-2 winner (10).
        _exp("20", "multi", "none", proj_align=True, backbones=("clip",)),
        _exp("21", "multi", "none", proj_align=True, backbones=("detr",)),
        # Round 4 (table 5): extra data from FBHM, 15 more epochs (section 5.1.4).
        _exp("30", "multi", "none", proj_align=True, multi_task=True, epochs=30),
    ]
}

# Epochs of every experiment but 30 (section 4).
PAPER_EPOCHS = 15

# Section 5.1: each round compares these experiments (the previous winner first).
ROUNDS: dict[int, list[str]] = {
    1: ["00", "01", "02", "03"],
    2: ["02", "10", "12", "13"],
    3: ["10", "20", "21"],
    4: ["10", "30"],
}

# The paper's table number for each round.
ROUND_TABLES = {1: 2, 2: 3, 3: 4, 4: 5}


def list_experiments() -> list[str]:
    """Names of the paper's experiments."""
    return list(PAPER_EXPERIMENTS)


def get_experiment(name: str, **overrides) -> Experiment:
    """Look up a paper experiment by name, optionally replacing fields.

    Args:
        name: "00", "01", "02", "03", "10", "12", "13", "20", "21" or "30".
        **overrides: Experiment fields to change (unknown fields are rejected).
    Returns:
        The frozen Experiment.
    """
    try:
        exp = PAPER_EXPERIMENTS[str(name)]
    except KeyError:
        raise MamikitError(f"unknown experiment {name!r}; known: {', '.join(PAPER_EXPERIMENTS)}") from None
    if overrides:
        try:
            exp = dataclasses.replace(exp, **overrides)
        except TypeError as exc:
            raise MamikitError(f"experiment {name}: {exc}") from None
    return exp


def run_dir_for(runs_root, round_no: int, name: str, seed: int) -> Path:
    """Where a round's run lives: `<runs_root>/round<N>/<experiment>-seed<k>` (DESIGN.md)."""
    return Path(runs_root) / f"round{round_no}" / f"{name}-seed{seed}"


def run_round(round_no: int, data_root, features_root, runs_root, profile="demo", seeds=(0,), train_overrides=None, progress=True) -> list[Path]:
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
    Returns:
        The run directories, in order.
    """
    from . import train as train_mod

    if round_no not in ROUNDS:
        raise MamikitError(f"unknown round {round_no}; rounds are {sorted(ROUNDS)}")
    train_overrides = dict(train_overrides or {})
    dirs = []
    for name in ROUNDS[round_no]:
        for seed in seeds:
            out = run_dir_for(runs_root, round_no, name, seed)
            # A round starts from the previous winner: reuse its complete run from an earlier round.
            done = [d for d in sorted(Path(runs_root).glob(f"round*/{name}-seed{seed}")) if train_mod.run_is_complete(d)]
            if done:
                print(f"round {round_no}: experiment {name} seed {seed} is complete in {done[0]}, reused")
                dirs.append(done[0])
                continue
            settings = dict(train_overrides)
            if settings.get("epochs"):
                # Keep the paper's ratios when the epochs are scaled down: experiment 30 trains twice as long.
                settings["epochs"] = max(1, round(settings["epochs"] * get_experiment(name).epochs / PAPER_EPOCHS))
            cfg = train_mod.TrainConfig(seed=seed, **settings)
            # resume=True continues an interrupted run and starts a fresh one otherwise
            train_mod.train(get_experiment(name), data_root, features_root, out, profile=profile, train_cfg=cfg, resume=True, progress=progress)
            dirs.append(out)
    return dirs


def cli_round(args) -> int:
    """`python -m mamikit round`: run one round for the given seeds."""
    from .profiles import get_profile

    profile = get_profile(args.profile, clip_model=args.clip_model, clip_pretrained=args.clip_pretrained, detr_model=args.detr_model, text_model=args.text_model, weights=args.weights)
    overrides = {"device": args.device}
    for field in ("epochs", "evals_per_epoch", "accumulation", "lr"):
        if getattr(args, field, None) is not None:
            overrides[field] = getattr(args, field)
    seeds = [int(s) for s in str(args.seeds).split(",") if s.strip()]
    run_round(args.round, args.data, args.features, args.out, profile=profile, seeds=seeds, train_overrides=overrides)
    return 0
