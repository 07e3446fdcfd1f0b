"""The run directory: a run's model, its predictions and scores, the official answer files (section 4).

One training run writes one folder::

    config.json     every setting, resolved
    log.jsonl       one row per evaluation x split x task x metric
    predictions/    last/ and best-<task>/: <split>__<task>.csv with ids, gold labels, probabilities
    answer/         last/ and best/: taskA/answer.txt and taskB/answer.txt in the official format
    checkpoints/    last/ and best-<task>/: weights.safetensors + state.json (mamikit.checkpoints);
                    a finished run keeps the weights its keep_weights names, and last/state.json

The training loop (`mamikit.train`) opens it (:func:`open_run_dir`) and fills
it through `evaluation.record_evaluation`; prediction, figures and reports
read it through :func:`load_run` and `evaluation.predict_split`, so none of
them needs the loop. docs/design.md "Run directory" describes each file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .batching import SplitData
from .checkpoints import check_finished, kept_checkpoints, keeping, load_checkpoint
from .experiments import Experiment
from .model import MamiModel, ModelConfig
from .profiles import Profile
from .registry import Task, dataset_modalities, official_task_names, primary_dataset
from .utils import MamikitError, atomic_write, get_logger, pick_device, read_json, write_json

log = get_logger(__name__)

CONFIG_FILE = "config.json"  # every setting of the run, resolved
LOG_FILE = "log.jsonl"  # one row per evaluation x split x task x metric


# ----------------------------------------------------------------------------- the directory


def run_is_complete(run_dir) -> bool:
    """Whether a run directory holds a finished run (its `last/state.json` says so, with or without weights)."""
    path = Path(run_dir) / "checkpoints" / "last" / "state.json"
    if not path.exists():
        return False
    try:
        return bool(read_json(path).get("complete"))
    except MamikitError:
        return False


# Experiment fields added after runs were recorded, with the value their absence means: the run trained as
# with that value (query_align off; profile None, the run's own; no extra dataset). (Not every new field reads
# so: a run recorded before row 21's `schedule_as_coded` trained on a schedule that is neither value, so it
# reads as changed.)
FIELDS_ABSENT_MEAN = {"query_align": False, "profile": None, "extra_datasets": []}
# Training values that say how a run is computed, not what it is: recorded in config.json, never compared (a
# run trained with them either way, or resumed with the other value, is the same run up to dropout's draws and
# float rounding; TrainConfig.merge_batches, TrainConfig.compile).
COMPUTED_HOW = ("merge_batches", "compile")


def recorded_values(section: str, recorded) -> dict:
    """A config.json section ("experiment", "train", ...) as runs compare it: the fields it predates read as their
    default, and the training values that only say how it was computed (`COMPUTED_HOW`) left out."""
    recorded = dict(recorded) if isinstance(recorded, dict) else {}
    if section == "experiment":
        for name, value in FIELDS_ABSENT_MEAN.items():
            recorded.setdefault(name, value)
    if section == "train":
        for name in COMPUTED_HOW:
            recorded.pop(name, None)
    return recorded


def open_run_dir(run_dir: Path, config: dict, resume: bool, last: Path | None = None) -> str:
    """Make `run_dir` ready to train with `config` (written to config.json).

    On resume, `config["provenance"]` (mamikit.provenance) gets the first
    attempt's `first_started` and the attempt count from the old config.json.

    Returns:
        "resume" (continue from the last checkpoint), "new" (start over) or
        "complete" (the run with these settings is finished; nothing was written).
    """
    last = last or run_dir / "checkpoints" / "last"  # the checkpoint to resume from (train may keep it locally)
    if resume and ((last / "weights.safetensors").exists() or (last / "state.json").exists()):
        old = read_json(run_dir / CONFIG_FILE)
        if not isinstance(old, dict) or not {"experiment", "train"} <= set(old):
            raise MamikitError(f"{run_dir / CONFIG_FILE}: not a mamikit run configuration")
        for key in ("experiment", "train"):
            if recorded_values(key, old[key]) != recorded_values(key, config[key]):
                prev = recorded_values(key, old[key])
                changed = sorted(k for k in set(prev) | set(config[key]) if prev.get(k) != config[key].get(k))
                raise MamikitError(f"{run_dir / CONFIG_FILE}: the run was started with other {key} settings "
                                   f"({', '.join(changed[:4])}); use a new run directory")
        if run_is_complete(run_dir):
            check_finished(run_dir / "checkpoints")  # the kept weights still whole? (checksums)
            return "complete"
        if not (last / "weights.safetensors").exists():  # a state.json alone: a damaged one names itself
            read_json(last / "state.json")
            raise MamikitError(f"{last}: no weights to resume from; use a new run directory")
        if isinstance(old.get("provenance"), dict) and isinstance(config.get("provenance"), dict):
            # config.json describes the latest attempt; the first attempt's start and the count carry over
            first = old["provenance"].get("first_started") or old["provenance"].get("started")
            config["provenance"].update(first_started=first, attempt=int(old["provenance"].get("attempt", 1)) + 1)
    elif (run_dir / LOG_FILE).exists() and not resume:
        raise MamikitError(f"{run_dir} already holds a run; pass --resume to continue it or choose another --out")
    else:
        resume = False
    run_dir.mkdir(parents=True, exist_ok=True)
    for stale in run_dir.rglob(".*.tmp"):  # temporary files of a process killed before its rename
        stale.unlink()
    write_json(run_dir / CONFIG_FILE, config)
    return "resume" if resume else "new"


def truncate_log(run_dir: Path, max_step: int) -> None:
    """Drop log rows written after the checkpoint a resumed run restarts from."""
    path = run_dir / LOG_FILE
    if not path.exists():
        return
    keep = []
    with open(path, encoding="utf-8", errors="replace") as fh:
        for line in fh:
            try:
                row = json.loads(line)
                step = int(row["step"])
            except (ValueError, KeyError, TypeError):
                continue  # a row cut by a kill (or damaged): its evaluation is redone or was kept whole elsewhere
            if step <= max_step:
                keep.append(line if line.endswith("\n") else line + "\n")
    with atomic_write(path, "w") as fh:
        fh.writelines(keep)


# ----------------------------------------------------------------------------- a run's model


def build_model(experiment: Experiment, profile: Profile, widths: dict, tasks, device,
                special_ids: tuple[int, int] | None = None) -> MamiModel:
    """The architecture of figures 1-2 for this experiment, on top of the profile's text model.

    Args:
        experiment, profile, tasks: what `ModelConfig.from_experiment` takes.
        widths: backbone -> width of its stored vectors (`FeatureStore.dims`); no store is needed.
        device: where the model goes.
        special_ids: ([CLS], [SEP]) as the store recorded them (`FeatureStore.special_ids`); the profile's
            tokenizer must agree. None: the tokenizer's (a store written before they were recorded).
    """
    from .backbones import load_text

    text = load_text(profile, "cpu")
    ids = (text.tokenizer.cls_token_id, text.tokenizer.sep_token_id)
    if None in ids:
        raise MamikitError(f"text model {profile.text_model}: its tokenizer has no [CLS]/[SEP] token ids")
    if special_ids is not None and tuple(special_ids) != ids:
        raise MamikitError(f"the feature store's text was tokenized with [CLS]/[SEP] ids {tuple(special_ids)}; "
                           f"text model {profile.text_model} has {ids}: extract the store again with this profile")
    cfg = ModelConfig.from_experiment(experiment, profile, widths, tasks, cls_token_id=ids[0], sep_token_id=ids[1])
    return MamiModel(cfg, text.model).to(device)


@dataclass
class LoadedRun:
    """A trained model with what is needed to run it again."""

    run_dir: Path
    model: MamiModel
    experiment: Experiment
    profile: Profile
    config: dict
    tasks: tuple
    state: dict
    device: torch.device


def load_run(run_dir, checkpoint: str = "best", task: str | None = None, device="auto",
             features_root=None) -> LoadedRun:
    """Rebuild a run's model and load its `last` or `best-<task>` checkpoint.

    Args:
        run_dir: the run directory.
        checkpoint: "best" (best dev score of `task`) or "last".
        task: whose best checkpoint to load (default: the official Task A, mamikit/tasks.json).
        device: where to put the model.
        features_root: the feature store or the features root above it, when it moved since training
            (default: the store config.json records).
    Returns:
        A LoadedRun.
    """
    from .store import FeatureStore, store_dir

    run_dir = Path(run_dir)
    config = read_json(run_dir / CONFIG_FILE)
    experiment = Experiment.from_dict(config["experiment"])
    profile = Profile(**config["profile"])
    tasks = tuple(Task(t["name"], t["dataset"], tuple(t["labels"])) for t in config["tasks"])
    device = pick_device(device)
    store = FeatureStore(store_dir(features_root or config["features"], profile.name))
    model = build_model(experiment, profile, store.dims, tasks, device, store.special_ids)
    task = task or official_task_names()[0]
    folder = checkpoint_folder(run_dir, "last" if checkpoint == "last" else f"best-{task}")
    state = load_checkpoint(folder, model)
    model.eval()
    return LoadedRun(run_dir, model, experiment, profile, config, tasks, state, device)


def checkpoint_folder(run_dir, name: str, purpose: str = "") -> Path:
    """`<run_dir>/checkpoints/<name>` (`last` or `best-<task>`) when it holds weights; else MamikitError saying
    why not.

    A finished run that did not keep them names its keep_weights and the values that keep them.
    """
    run_dir = Path(run_dir)
    folder = run_dir / "checkpoints" / name
    if (folder / "weights.safetensors").exists():
        return folder
    need = f"{purpose} needs {name} weights: " if purpose else ""
    if not run_is_complete(run_dir):
        raise MamikitError(f"{folder}: {need}no checkpoint there (has the run evaluated, and reached a copy point?)")
    config = read_json(run_dir / CONFIG_FILE)
    recorded = (config.get("checkpoints") or {}).get("keep_weights", "all")  # runs before keep_weights kept all
    tasks = [t["name"] for t in config.get("tasks", [])]
    if name in kept_checkpoints(recorded, tasks):
        raise MamikitError(f"{folder}: {need}no checkpoint there, though keep_weights={recorded!r} keeps it "
                           "(deleted?)")
    raise MamikitError(f"{run_dir}: {need}the finished run kept no `{name}` weights (keep_weights={recorded!r}); "
                       f"keep_weights {' or '.join(map(repr, keeping(name)))} keeps them")


# ----------------------------------------------------------------------------- the run's data


def prepare_data(experiment: Experiment, data_root, store) -> dict[tuple[str, str], SplitData]:
    """Join the readers' labels with the feature store's rows for each (dataset, split).

    Memes the store skipped (unreadable images) are left out and counted.
    The authors' split (``experiment.authors_split``) reads train and dev
    from the store's train and dev files together. A dataset of one modality
    (mamikit/tasks.json) reads only its backbones: a text-only one its text.
    """
    from .batching import pool_features, text_length_note
    from .data import load_datasets

    split_seed = int(store.manifest.get("split_seed", 0))
    loaded = load_datasets(data_root, datasets=list(experiment.datasets), split_seed=split_seed,
                           authors_split=experiment.authors_split)
    out = {}
    for name in experiment.datasets:
        if name not in loaded:
            raise MamikitError(f"experiment {experiment.name} needs {name} data under {data_root}, "
                               "which was not found")
        ds = loaded[name]
        modalities = dataset_modalities(name)
        backbones = (list(experiment.image_encoders) if "image" in modalities else []) + \
            (["text"] if "text" in modalities else [])
        for split, df in ds.splits.items():
            if df is None or len(df) == 0:
                continue
            if experiment.authors_split and split in ("train", "dev"):
                feats = pool_features([store.load(name, s, backbones) for s in ("train", "dev")])
            else:
                feats = store.load(name, split, backbones)
            have = set(feats.ids)
            keep = df[df["id"].isin(have)]
            missing = len(df) - len(keep)
            if missing:
                log.info("%s/%s: %d memes have no features (skipped at extraction) and are left out", name, split,
                         missing)
            ids = keep["id"].astype(str).tolist()
            targets = keep[list(ds.labels)].to_numpy(dtype=np.float32)
            out[(name, split)] = SplitData(name, split, ids, feats.rows(ids), targets, tuple(ds.labels), feats,
                                           modalities)
    primary = primary_dataset()
    if (primary, "train") not in out:
        raise MamikitError(f"no {primary} training memes with features: check {data_root} and the feature store")
    note = text_length_note(out, store.manifest.get("backbones", {}).get("text", {}).get("max_tokens"),
                            experiment.text_tokens)
    if note:
        log.warning("%s", note)
    return out
