"""The configuration of a run and of a whole study: `TrainConfig` (section 4) and `Settings`.

Two frozen dataclasses, each value in one of them:

- :class:`TrainConfig`: how one run trains and evaluates (section 4: 15 epochs,
  batches of 16, 20 batches per optimiser step, MADGRAD at 2e-4, 7 evaluations
  per epoch), where its checkpoints go and which weights it keeps. Its defaults
  are the paper's.
- :class:`Settings`: what a researcher sets once for every notebook and command:
  the profile, the recipe, the folders, the seeds, and one ``train`` TrainConfig.

Each profile trains from a preset (:data:`TRAINING_PRESETS`): ``paper`` is
TrainConfig's defaults, ``demo`` a few epochs on a CPU; every other full
profile of mamikit/profiles.json takes ``paper``'s and every tiny one
``demo``'s (:func:`preset_name`). A settings file keeps
the profile and only the training values that differ from its preset, so the
same file read with another profile takes that profile's preset under the
values it names. The notebooks (``mk.load_settings(SETTINGS, **OVERRIDES)``),
``python -m mamikit train`` / ``round`` (options derived from the fields by
:func:`add_setting_options`) and the Python API all go through
:func:`load_settings`, so a profile trains the same from every entry point.

The experiment (what system is trained) and the model built from it are
``experiments.Experiment`` and ``model.ModelConfig``; this module sits below the
training loop it configures and imports neither.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path

from .colab import COLAB_SETTINGS, DEFAULT_PROJECT, install_requirement, on_colab, settings_path
from .experiments import RECIPES, ROUNDS, get_experiment
from .profiles import PROFILE_NAMES, WEIGHTS, is_tiny
from .registry import primary_dataset
from .utils import MamikitError, write_json

SETTINGS_ENV = "MAMIKIT_SETTINGS"  # a settings file read when none is passed

KEEP_WEIGHTS = ("best", "last", "best+last", "all")  # TrainConfig.keep_weights values, narrowest first
TRAIN_SCORES = ("running", "full")


def _setting(default, meaning: str, choices: tuple | None = None):
    """A dataclass field whose meaning (and allowed values) the CLI's help and `settings_fields` show."""
    return field(default=default, metadata={"help": meaning, "choices": choices})


def check_keep_weights(value, owner: str) -> None:
    """A MamikitError naming `owner` (what was being read) unless `value` is one of KEEP_WEIGHTS."""
    if value not in KEEP_WEIGHTS:
        raise MamikitError(f"{owner}: keep_weights must be one of {', '.join(map(repr, KEEP_WEIGHTS))}, got {value!r}")


def check_fields(config, owner: str) -> None:
    """Check the values of a settings dataclass against their allowed choices and types."""
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        value, choices = getattr(config, f.name), f.metadata.get("choices")
        if choices and value not in choices:
            raise MamikitError(f"{owner}: {f.name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
        kind = _scalar_type(hints[f.name])
        if kind is None or value is None:
            continue
        ok = isinstance(value, bool) if kind is bool else (isinstance(value, kind) and not isinstance(value, bool))
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            ok = True
        if not ok:
            raise MamikitError(f"{owner}: {f.name} must be {_type_name(kind)}, got {value!r}")


def _scalar_type(hint):
    """int, float, str or bool for a field annotated with one (optionally `| None`); None for others."""
    args = [a for a in typing.get_args(hint) if a is not type(None)] if typing.get_args(hint) else [hint]
    return args[0] if len(args) == 1 and args[0] in (int, float, str, bool) else None


def _type_name(kind) -> str:
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}[kind]


@dataclass(frozen=True)
class TrainConfig:
    """How one run trains and evaluates (section 4); the defaults are the paper's."""

    epochs: int | None = _setting(None, "training epochs; None: the experiment's own (15, or 30 for experiment 30)")
    batch_size: int = _setting(16, "memes per batch, each batch from one dataset (algorithm 1)")
    lr: float = _setting(2e-4, "MADGRAD learning rate")
    accumulation: int = _setting(20, "batches per optimiser step")
    warmup_fraction: float = _setting(0.1, "linear warm-up steps as a fraction of all optimiser steps")
    weight_decay: float = _setting(5e-4, "weight decay of every parameter but biases and LayerNorm weights")
    clip_norm: float = _setting(0.5, "bound on the overall gradient norm")
    evals_per_epoch: int = _setting(7, "evaluations of every split per epoch (figure 5's samples)")
    eval_batch_size: int = _setting(64, "memes per batch at evaluation")
    seed: int = _setting(0, "seeds the model's initialisation, the batch order and dropout")
    device: str = _setting("auto", "where to train: auto (CUDA when there is one), cpu, cuda or cuda:N")
    amp: bool = _setting(False, "mixed precision on CUDA: bf16 autocast where supported, else fp16 with a GradScaler")
    # Where checkpoints go and which stay (docs/checkpoints.md "Checkpoints on Drive"): not what the run computes.
    checkpoint_every: int = _setting(35, "evaluations between copies of the resumable checkpoint from local disk "
                                         "into the run folder; 1: straight into the run folder every evaluation")
    checkpoint_minutes: float | None = _setting(10.0, "minutes of wall-clock time after which the resumable "
                                                      "checkpoint is also copied into the run folder at the next "
                                                      "evaluation; None: by evaluations only")
    local_dir: str | None = _setting(None, "local folder of the resumable checkpoint; None: $MAMIKIT_LOCAL or the "
                                           "temp folder")
    keep_weights: str = _setting("best", "weights a finished run keeps: best (the official Task A's best-dev "
                                         "checkpoint), last, best+last, or all (every task's best and last)",
                                 KEEP_WEIGHTS)
    local_store: bool | None = _setting(None, "train from a verified copy of the feature store on local disk "
                                              "(under local_dir), made once per machine; None: on Colab only, where "
                                              "the store on Drive reads slowly")
    train_scores: str = _setting("running", "train-split scores from the epoch's running training predictions (the "
                                            "authors' way) or from a full eval-mode pass at each epoch's end",
                                 TRAIN_SCORES)
    init_from: str | None = _setting(None, "a run folder whose last weights start this run, with a fresh optimiser "
                                           "and schedule (experiment 30's second stage, section 5.1.4)")
    # Memory: the activations of the merged batch, up to the window's micro-batches of one dataset at once
    # (accumulation x batch_size memes at most, about half of that with two datasets), against one micro-batch's.
    merge_batches: bool = _setting(True, "run the batches of one dataset within an accumulation window as one "
                                         "forward and backward pass, each batch's loss on its own (the same "
                                         "gradients up to dropout's draws; on a GPU far fewer launches); "
                                         "needs the merged batch's activations in memory at once")
    compile: bool = _setting(False, "compile the training step's forward and backward passes with torch.compile "
                                    "(one graph per dataset, any batch size; minutes to compile at a run's start, "
                                    "then fused kernels: for GPUs, where an eager step waits on launching its "
                                    "operators; the same gradients up to dropout's draws and float rounding)")

    def __post_init__(self):
        check_fields(self, "train config")
        for name in ("batch_size", "accumulation", "evals_per_epoch", "eval_batch_size", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise MamikitError(f"train config: {name} must be a positive integer, got {getattr(self, name)!r}")
        if self.checkpoint_minutes is not None and not self.checkpoint_minutes > 0:
            raise MamikitError(f"train config: checkpoint_minutes must be a positive number or None, "
                               f"got {self.checkpoint_minutes!r}")
        if self.epochs is not None and self.epochs < 1:
            raise MamikitError(f"train config: epochs must be a positive integer, got {self.epochs!r}")
        if not 0 <= self.warmup_fraction < 1:
            raise MamikitError("train config: warmup_fraction must be in [0, 1)")
        if not self.lr >= 0:
            raise MamikitError(f"train config: lr must be a non-negative number, got {self.lr!r}")


def _integers(value, message: str) -> tuple[int, ...]:
    """An integer or a list of them as a tuple of ints; MamikitError(message) for anything else."""
    try:
        return tuple(int(v) for v in ((value,) if isinstance(value, int) else value))
    except (TypeError, ValueError):
        raise MamikitError(message) from None


# The training values each profile starts from; a setting changes any of them.
TRAINING_PRESETS: dict[str, TrainConfig] = {
    "paper": TrainConfig(),  # section 4
    "demo": TrainConfig(epochs=3, evals_per_epoch=2, accumulation=1, lr=1e-3, checkpoint_every=2),  # minutes on a CPU
}
TRAIN_FIELDS = tuple(f.name for f in dataclasses.fields(TrainConfig))


def preset_name(profile: str) -> str:
    """The training preset a registered profile starts from: its own, else `demo` for tiny ones, `paper` for others."""
    if profile in TRAINING_PRESETS:
        return profile
    if profile not in PROFILE_NAMES:
        raise MamikitError(f"settings: profile must be one of {PROFILE_NAMES}, got {profile!r}")
    return "demo" if is_tiny(profile) else "paper"


@dataclass(frozen=True)
class Settings:
    """Everything a researcher sets once for all notebooks and commands: profile, folders, seeds, training."""

    profile: str = _setting("demo", "backbones and sizes: demo (offline, CPU), paper (section 3.1) or another of "
                                    "mamikit/profiles.json (`mamikit profiles`)", PROFILE_NAMES)
    weights: str = _setting("pretrained", "pretrained, or random: the profile's architectures with seeded random "
                                          "weights, nothing downloaded", WEIGHTS)
    recipe: str = _setting("paper", "switch values where the paper and its authors' code differ "
                                    "(docs/fidelity.md)", tuple(RECIPES))
    run_root: str | None = _setting(None, "runs, report and figures go under here, and the data and the store "
                                          "by default; None: runs/<profile> (on Colab an error: 00_setup sets it)")
    data_root: str | None = _setting(None, "folder with MAMI/ and FBHM/; None: <run_root>/data")
    features_root: str | None = _setting(None, "the features root: each profile's store in <features_root>/<profile>, "
                                               "or the store itself if one is there; None: <run_root>/features")
    seeds: tuple[int, ...] = _setting((0,), "seeds of every experiment (section 5.1 reports several)")
    rounds: tuple[int, ...] = _setting((1, 2, 3, 4), "the rounds this study runs (section 5.1); notebook 01 checks "
                                                     "that the datasets they train on are there")
    install: str | None = _setting(None, "the pip requirement the notebooks' Colab set-up cell installs mamikit "
                                         "with (00_setup writes it from its SOURCE)")
    # The training values: the profile's preset (TRAINING_PRESETS) with the fields of a dict replaced, or a
    # whole TrainConfig as given. `seed` is each run's own (`train_config(seed=k)`).
    train: TrainConfig | dict | None = None

    def __post_init__(self):
        check_fields(self, "settings")
        seeds = _integers(self.seeds, f"settings: seeds must be a list of integers, got {self.seeds!r}")
        if not seeds:
            raise MamikitError("settings: seeds must name at least one seed")
        object.__setattr__(self, "seeds", seeds)
        rounds = _integers(self.rounds, f"settings: rounds must be a list of round numbers, got {self.rounds!r}")
        unknown = [r for r in rounds if r not in ROUNDS]
        if unknown or not rounds:
            raise MamikitError(f"settings: rounds must name rounds among {sorted(ROUNDS)}, got {self.rounds!r}")
        object.__setattr__(self, "rounds", rounds)
        colab = on_colab()
        if colab and self.run_root is None:
            raise MamikitError(f"settings: run_root is not set; on Colab every folder lives on Drive: run "
                               f"notebooks/00_setup.ipynb (it writes {COLAB_SETTINGS})")
        run_root = Path("runs") / self.profile if self.run_root is None else Path(self.run_root)
        for name, default in (("run_root", run_root), ("data_root", run_root / "data"),
                              ("features_root", run_root / "features")):
            value = Path(default if getattr(self, name) is None else getattr(self, name))
            if colab and not value.is_absolute():
                raise MamikitError(f"settings: {name} {str(value)!r} is relative: on Colab it would be written on "
                                   f"the VM's disk and lost at the next reset; give a folder on Drive "
                                   f"(e.g. {DEFAULT_PROJECT}/{self.profile}/...) or run notebooks/00_setup.ipynb")
            object.__setattr__(self, name, str(value))
        if not isinstance(self.train, TrainConfig):
            object.__setattr__(self, "train", training(self.profile, self.train or {}))

    @property
    def runs(self) -> Path:
        """Where the rounds' runs go: `<run_root>/runs`."""
        return Path(self.run_root) / "runs"

    @property
    def report(self) -> Path:
        """Where tables and figures go: `<run_root>/report`."""
        return Path(self.run_root) / "report"

    def train_config(self, **fields) -> TrainConfig:
        """The TrainConfig of one run (e.g. `seed=1`): the settings' training values with `fields` replaced."""
        return replace_fields(self.train, fields, "train config")

    def train_overrides(self) -> dict:
        """The training values as TrainConfig fields for `rounds.run_round(train_overrides=...)`.

        Each run's own `seed` and `init_from` are the round's to set; values left None (epochs: the
        experiment's own) are left out.
        """
        per_run = ("seed", "init_from")
        return {k: v for k, v in dataclasses.asdict(self.train).items() if k not in per_run and v is not None}

    def changed_training(self) -> dict:
        """The training values that differ from the profile's preset: what a settings file keeps."""
        preset = dataclasses.asdict(TRAINING_PRESETS[preset_name(self.profile)])
        return {k: v for k, v in dataclasses.asdict(self.train).items() if v != preset[k]}

    def datasets(self) -> tuple[str, ...]:
        """The datasets the experiments of `rounds` train on (MAMI, and FBHM for round 4's multi-task ones)."""
        names = {d for r in self.rounds for e in ROUNDS[r] for d in get_experiment(e, recipe=self.recipe).datasets}
        return tuple(sorted(names, key=lambda d: (d != primary_dataset(), d)))

    def require_round(self, round_no: int) -> None:
        """Refuse to run a round the settings leave out: notebooks 01 and 02 prepared only the datasets and stores
        of the settings' `rounds` (round 5 needs more of both)."""
        if round_no not in self.rounds:
            raise MamikitError(f"settings: round {round_no} is not among the rounds {list(self.rounds)}; add it "
                               "(00_setup's ROUNDS, or `rounds` in the settings file), then run 01 and 02 again "
                               "for the datasets and feature stores it needs")

    def store_dir(self, profile: str | None = None) -> Path:
        """Where a profile's feature store is (`store.store_dir`): `<features_root>/<profile>`, or the features
        root itself when a store was written there directly. None: these settings' profile."""
        from .store import store_dir

        return store_dir(self.features_root, profile or self.profile)

    def profiles(self) -> tuple:
        """The Profiles the experiments of `rounds` train with, each needing its store (notebook 02): these
        settings' own first, then each other one an experiment names (round 5's 41: `vit-l-14`, its tiny
        variant under `demo`; `profiles.for_experiment`)."""
        from .profiles import for_experiment

        own = self.get_profile()
        out = {own.name: own}
        for r in self.rounds:
            for name in ROUNDS[r]:
                profile = for_experiment(own, get_experiment(name, recipe=self.recipe).profile)
                out.setdefault(profile.name, profile)
        return tuple(out.values())

    def get_profile(self):
        """The Profile these settings name (`profiles.get_profile` with `weights`)."""
        from .profiles import get_profile

        return get_profile(self.profile, weights=self.weights)

    def to_dict(self) -> dict:
        """Every value as JSON, the training values in full."""
        return dict(dataclasses.asdict(self), seeds=list(self.seeds), rounds=list(self.rounds),
                    train=dataclasses.asdict(self.train))

    def save(self, path) -> Path:
        """Write the settings as JSON (atomically), training values only where they differ from the preset."""
        path = Path(path)
        write_json(path, dict(self.to_dict(), train=self.changed_training()))
        return path


SETTINGS_FIELDS = tuple(f.name for f in dataclasses.fields(Settings) if f.name != "train")


def replace_fields(config, values: dict, owner: str):
    """`dataclasses.replace` that names an unknown field and the known ones."""
    names = [f.name for f in dataclasses.fields(config)]
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise MamikitError(f"{owner}: unknown field {unknown[0]!r}; known: {', '.join(names)}")
    return dataclasses.replace(config, **values)


def training(profile: str, values: dict) -> TrainConfig:
    """The profile's training preset (:func:`preset_name`) with `values` (TrainConfig fields) replaced."""
    return replace_fields(TRAINING_PRESETS[preset_name(profile)], dict(values), "settings: train")


def settings_fields() -> dict[str, str]:
    """Every name `load_settings` (and a notebook's OVERRIDES) takes, with its meaning."""
    both = [f for cls in (Settings, TrainConfig) for f in dataclasses.fields(cls) if f.name != "train"]
    return {f.name: f.metadata["help"] for f in both}


def _split(values: dict, owner: str) -> tuple[dict, dict]:
    """Flat values -> (Settings fields, TrainConfig fields); `train` may hold the latter as a dict."""
    values = dict(values)
    train = values.pop("train", None) or {}
    if not isinstance(train, dict):
        raise MamikitError(f"{owner}: train must be an object of training values, got {train!r}")
    train = dict(train)
    unknown = sorted(set(values) - set(SETTINGS_FIELDS) - set(TRAIN_FIELDS))
    if unknown:
        raise MamikitError(f"{owner}: unknown setting {unknown[0]!r}; known: "
                           f"{', '.join(SETTINGS_FIELDS + TRAIN_FIELDS)}")
    train.update({k: values.pop(k) for k in list(values) if k in TRAIN_FIELDS})
    return values, train


def read_settings_file(path) -> dict:
    """The values of a settings file; MamikitError naming the file for bad JSON or an unknown key."""
    path = Path(path)
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MamikitError(f"{path}: settings file not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MamikitError(f"{path}: not a readable JSON settings file ({exc})") from None
    if not isinstance(values, dict):
        raise MamikitError(f"{path}: a settings file holds one JSON object")
    _split(values, str(path))  # names an unknown key
    return values


def load_settings(path=None, **overrides) -> Settings:
    """Settings from a JSON file, then the keyword values that are not None (a notebook's OVERRIDES).

    Args:
        path: a settings file; None reads $MAMIKIT_SETTINGS if set, on Colab the file 00_setup wrote
            (:data:`colab.COLAB_SETTINGS`, an error when missing), else starts from the defaults.
        **overrides: Settings or TrainConfig fields by name (`settings_fields()` lists them); None leaves the
            file's (or the preset's) value.
    Returns:
        The frozen Settings, its training values the profile's preset under the file's, under the overrides.
    """
    path = path or os.environ.get(SETTINGS_ENV) or None
    if path is None and on_colab():
        path = settings_path()
        if not path.is_file():
            raise MamikitError(f"{path}: no settings file; on Colab run notebooks/00_setup.ipynb once first (it "
                               f"writes this file on Drive and every notebook reads it), or set SETTINGS")
    values = read_settings_file(path) if path else {}
    settings, train = _split(values, str(path) if path else "settings")
    given, given_train = _split({k: v for k, v in overrides.items() if v is not None}, "settings")
    train.update(given_train)
    try:
        return settings_from(dict(settings, **given, train=train))
    except MamikitError as exc:
        raise MamikitError(f"{path}: {exc}" if path else str(exc)) from None


def settings_from(values: dict) -> Settings:
    """Settings from values by name (Settings or TrainConfig fields, or `train` as a dict); no file is read."""
    settings, train = _split(values, "settings")
    return Settings(**settings, train=train)


# ----------------------------------------------------------------------------- Colab's set-up notebook


def colab_setup(project: str = DEFAULT_PROJECT, source: str | None = None, profile: str = "paper", seeds=(0,),
                path=None, **values) -> Settings:
    """Write the settings every notebook reads on Colab (00_setup's job) and return them.

    Args:
        project: the Drive folder everything goes under; the run folder, the data and the feature store default
            to ``<project>/<profile>/`` (``data/``, ``features/``; runs and report beside them).
        source: where the notebooks install mamikit from (:func:`colab.install_requirement`); None keeps the one an
            earlier settings file recorded.
        profile, seeds: as in `Settings`.
        path: the settings file; default :func:`colab.settings_path` (the fixed place every notebook looks).
        **values: any other setting by name (`mk.settings_fields()`), e.g. ``data_root`` or ``epochs``.
    Returns:
        The Settings written.
    """
    path = Path(path) if path else settings_path()
    project = Path(project)
    if not project.is_absolute():
        raise MamikitError(f"PROJECT: {str(project)!r} is relative; give a folder on Drive such as {DEFAULT_PROJECT}")
    install = install_requirement(source, profile) if source else None
    if install is None and path.is_file():
        install = read_settings_file(path).get("install")
    settings = settings_from(dict({"run_root": str(project / profile)}, profile=profile, seeds=list(seeds),
                                  install=install, **values))
    path.parent.mkdir(parents=True, exist_ok=True)
    settings.save(path)
    return settings


# ----------------------------------------------------------------------------- the CLI's options

# Options that keep a shorter name beside the field's own.
CLI_ALIASES = {"data_root": ["--data"], "features_root": ["--features"]}


def add_setting_options(parser: argparse.ArgumentParser, exclude=()) -> None:
    """One option per Settings and TrainConfig field (`--evals-per-epoch`, `--amp/--no-amp`, ...), all default None.

    A field added to either class becomes an option of `train` and `round` at once; a value not given
    on the command line leaves the settings file's, or the profile's preset.
    """
    parser.add_argument("--settings", metavar="FILE", help="settings file (mk.Settings.save; the notebooks' "
                        "SETTINGS): its values and its profile's training preset apply to every option not given")
    hints = {**typing.get_type_hints(Settings), **typing.get_type_hints(TrainConfig)}
    for f in [*dataclasses.fields(Settings), *dataclasses.fields(TrainConfig)]:
        if f.name in exclude or f.name == "train":
            continue
        flags = CLI_ALIASES.get(f.name, []) + ["--" + f.name.replace("_", "-")]
        kind, choices = _scalar_type(hints[f.name]), f.metadata.get("choices")
        default = f.default if f.default is not None else "none"
        meaning = f"{f.metadata['help']} (default: {default})"
        if kind is bool:
            parser.add_argument(*flags, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=meaning)
        elif f.name == "seeds":
            parser.add_argument(*flags, dest=f.name, default=None, metavar="0,1,2", type=_seed_list, help=meaning)
        else:
            parser.add_argument(*flags, dest=f.name, default=None, type=kind or str, choices=choices, help=meaning)


def _seed_list(text: str) -> list[int]:
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"seeds must be comma-separated integers, got {text!r}") from None


def settings_from_args(args) -> Settings:
    """The Settings of `train`/`round`: `--settings FILE` (or $MAMIKIT_SETTINGS), then every option given."""
    names = SETTINGS_FIELDS + TRAIN_FIELDS
    return load_settings(getattr(args, "settings", None), **{k: getattr(args, k) for k in names if hasattr(args, k)})
