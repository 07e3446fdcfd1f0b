"""One settings source for the notebooks and the CLI: profile, paths, seeds and the training values of section 4.

Every notebook starts with ``settings = mk.load_settings(SETTINGS, ...)``: the
profile and the Drive paths are written once, in a JSON file
(``Settings.save``), and read by all nine notebooks, by ``train --settings``
and by ``round --settings``. Training values left unset (None) take the
profile's defaults from :data:`PROFILE_TRAINING`: the ``paper`` profile trains
as section 4 says (15 epochs, 30 for experiment 30, 7 evaluations per epoch,
20 batches per optimiser step, lr 2e-4, batches of 16); the ``demo`` profile
trains briefly on a CPU. A value set explicitly always wins.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path

from .profiles import PROFILE_NAMES, WEIGHTS
from .utils import MamikitError, write_json

SETTINGS_ENV = "MAMIKIT_SETTINGS"  # a settings file read when none is passed

# The training values each profile uses when a setting leaves them None. The paper's are
# TrainConfig's defaults (section 4); epochs None is the experiment's own (15, or 30 for 30).
PROFILE_TRAINING: dict[str, dict] = {
    "paper": {"epochs": None, "evals_per_epoch": 7, "accumulation": 20, "lr": 2e-4, "batch_size": 16, "checkpoint_every": 35},
    "demo": {"epochs": 3, "evals_per_epoch": 2, "accumulation": 1, "lr": 1e-3, "batch_size": 16, "checkpoint_every": 2},
}
TRAINING_FIELDS = ("epochs", "evals_per_epoch", "accumulation", "lr", "batch_size", "checkpoint_every")


@dataclass(frozen=True)
class Settings:
    """Everything a researcher sets once for all notebooks (profile, paths, seeds, training values)."""

    profile: str = "demo"  # "demo" (offline, CPU) or "paper" (section 3.1's backbones)
    weights: str = "pretrained"  # "pretrained" or "random" (the profile's architectures, nothing downloaded)
    recipe: str = "paper"  # "paper" or "authors" (docs/fidelity.md)
    data_root: str | None = None  # folder with MAMI/ and FBHM/; None: runs/<profile>/data
    features_root: str | None = None  # feature store; None: runs/<profile>/features
    run_root: str | None = None  # runs, report and figures go under here; None: runs/<profile>
    seeds: tuple[int, ...] = (0,)  # seeds of every experiment (section 5.1 reports several)
    device: str = "auto"  # "auto", "cpu" or "cuda"
    amp: bool = False  # mixed precision on CUDA (bf16 where supported, else fp16 with a GradScaler)
    epochs: int | None = None  # None: the profile's (paper: the experiment's 15, or 30 for experiment 30)
    evals_per_epoch: int | None = None  # None: the profile's (paper: 7)
    accumulation: int | None = None  # batches per optimiser step; None: the profile's (paper: 20)
    lr: float | None = None  # MADGRAD learning rate; None: the profile's (paper: 2e-4)
    batch_size: int | None = None  # memes per batch; None: the profile's (paper: 16)
    checkpoint_every: int | None = None  # evaluations between copies of the resumable checkpoint into the run folder
    local_dir: str | None = None  # local folder of the resumable checkpoint; None: $MAMIKIT_LOCAL or the temp folder
    train_scores: str | None = None  # "running" (default: the epoch's training predictions) or "full" (an eval pass)
    keep_weights: str | None = None  # weights a finished run keeps: "best" (default), "last", "best+last" or "all"

    def __post_init__(self):
        if self.profile not in PROFILE_NAMES:
            raise MamikitError(f"settings: profile must be one of {PROFILE_NAMES}, got {self.profile!r}")
        if self.weights not in WEIGHTS:
            raise MamikitError(f"settings: weights must be one of {WEIGHTS}, got {self.weights!r}")
        from .experiments import RECIPES

        if self.recipe not in RECIPES:
            raise MamikitError(f"settings: recipe must be one of {tuple(RECIPES)}, got {self.recipe!r}")
        seeds = (self.seeds,) if isinstance(self.seeds, int) else self.seeds
        try:
            seeds = tuple(int(s) for s in seeds)
        except (TypeError, ValueError):
            raise MamikitError(f"settings: seeds must be a list of integers, got {self.seeds!r}") from None
        if not seeds:
            raise MamikitError("settings: seeds must name at least one seed")
        object.__setattr__(self, "seeds", seeds)
        for name, default in (("data_root", "data"), ("features_root", "features"), ("run_root", "")):
            if getattr(self, name) is None:
                object.__setattr__(self, name, str(Path("runs") / self.profile / default))
            else:
                object.__setattr__(self, name, str(getattr(self, name)))
        for name in ("epochs", "evals_per_epoch", "accumulation", "batch_size", "checkpoint_every"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise MamikitError(f"settings: {name} must be a positive integer, got {value!r}")
        if self.train_scores not in (None, "running", "full"):
            raise MamikitError(f"settings: train_scores must be 'running' or 'full', got {self.train_scores!r}")
        if self.keep_weights is not None:
            from .checkpoints import check_keep_weights

            check_keep_weights(self.keep_weights, "settings")
        if self.lr is not None and not self.lr >= 0:
            raise MamikitError(f"settings: lr must be a non-negative number, got {self.lr!r}")

    @property
    def runs(self) -> Path:
        """Where the rounds' runs go: `<run_root>/runs`."""
        return Path(self.run_root) / "runs"

    @property
    def report(self) -> Path:
        """Where tables and figures go: `<run_root>/report`."""
        return Path(self.run_root) / "report"

    def training(self) -> dict:
        """The training values in effect: each explicit value, else the profile's default."""
        defaults = PROFILE_TRAINING[self.profile]
        return {k: defaults[k] if getattr(self, k) is None else getattr(self, k) for k in TRAINING_FIELDS}

    def train_overrides(self) -> dict:
        """TrainConfig fields for `rounds.run_round(train_overrides=...)`; epochs there scale per experiment."""
        values = {k: v for k, v in self.training().items() if v is not None}
        values.update(device=self.device, amp=self.amp)
        if self.local_dir is not None:
            values["local_dir"] = self.local_dir
        if self.train_scores is not None:
            values["train_scores"] = self.train_scores
        if self.keep_weights is not None:
            values["keep_weights"] = self.keep_weights
        return values

    def train_config(self, **extra):
        """The TrainConfig of one run (e.g. `seed=1`); `extra` fields win over the settings."""
        from .train import TrainConfig

        return TrainConfig(**dict(self.train_overrides(), **extra))

    def get_profile(self):
        """The Profile these settings name (`profiles.get_profile` with `weights`)."""
        from .profiles import get_profile

        return get_profile(self.profile, weights=self.weights)

    def to_dict(self) -> dict:
        """Every field as JSON values (seeds as a list)."""
        return dict(dataclasses.asdict(self), seeds=list(self.seeds))

    def save(self, path) -> Path:
        """Write the settings as JSON (atomically); `load_settings(path)` reads them back."""
        path = Path(path)
        write_json(path, self.to_dict())
        return path


FIELDS = tuple(f.name for f in dataclasses.fields(Settings))


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
    unknown = sorted(set(values) - set(FIELDS))
    if unknown:
        raise MamikitError(f"{path}: unknown setting {unknown[0]!r}; known: {', '.join(FIELDS)}")
    return values


def load_settings(path=None, **overrides) -> Settings:
    """Settings from a JSON file, then the keyword values that are not None (a notebook's parameters).

    Args:
        path: a settings file; None reads $MAMIKIT_SETTINGS if set, else starts from the defaults.
        **overrides: Settings fields; None leaves the file's (or the default) value.
    Returns:
        The frozen Settings.
    """
    path = path or os.environ.get(SETTINGS_ENV) or None
    values = read_settings_file(path) if path else {}
    unknown = sorted(set(overrides) - set(FIELDS))
    if unknown:
        raise MamikitError(f"unknown setting {unknown[0]!r}; known: {', '.join(FIELDS)}")
    values.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return Settings(**values)
    except MamikitError as exc:
        raise MamikitError(f"{path}: {exc}" if path else str(exc)) from None


# CLI option (argparse dest) -> Settings field, for `train` and `round`.
CLI_FIELDS = {"profile": "profile", "weights": "weights", "recipe": "recipe", "data": "data_root",
              "features": "features_root", "device": "device", "amp": "amp", "epochs": "epochs",
              "evals_per_epoch": "evals_per_epoch", "accumulation": "accumulation", "lr": "lr",
              "batch_size": "batch_size", "checkpoint_every": "checkpoint_every", "local_dir": "local_dir",
              "train_scores": "train_scores", "keep_weights": "keep_weights"}


def settings_from_cli(args, explicit: set[str]) -> Settings:
    """`--settings FILE` of `train`/`round`: the file's values, then every option given on the command line."""
    given = {field: getattr(args, dest) for dest, field in CLI_FIELDS.items() if dest in explicit and hasattr(args, dest)}
    if "seeds" in explicit and hasattr(args, "seeds"):
        given["seeds"] = [int(s) for s in str(args.seeds).split(",") if s.strip()]
    return load_settings(args.settings, **given)
