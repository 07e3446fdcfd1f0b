"""The training loop of section 4: multi-task batches, MADGRAD, accumulation, evaluation, run log.

One explicit loop (`train`): batches drawn per algorithm 1, the loss of
equations 5-6, gradients accumulated over 20 batches, clipped at norm 0.5,
MADGRAD with a linear warm-up schedule, and evaluations several times per epoch
on train, dev and test whose scores are appended to `log.jsonl`. Checkpoints
are safetensors weights plus JSON state, so `resume=True` continues a killed run
exactly where its last evaluation left it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import __version__
from .batching import SplitData, epoch_batches, make_batch
from .checkpoints import _read_checkpoint, load_checkpoint, save_checkpoint
from .data import SPLITS
from .experiments import Experiment, get_experiment
from .losses import dataset_loss
from .metrics import score_a, score_b, write_answer
from .model import Batch, MamiModel, ModelConfig, param_groups
from .profiles import Profile, get_profile
from .utils import MamikitError, append_jsonl, atomic_write, fault_point, pick_device, read_json, seed_everything, write_json



@dataclass(frozen=True)
class TrainConfig:
    """Optimisation and evaluation settings (section 4); defaults are the paper's."""

    epochs: int | None = None  # None: the experiment's own (15, or 30 for experiment 30)
    batch_size: int = 16  # memes per batch, each from one dataset
    lr: float = 2e-4  # MADGRAD learning rate
    accumulation: int = 20  # batches per optimiser step
    warmup_fraction: float = 0.1  # warm-up steps as a fraction of all optimiser steps
    weight_decay: float = 5e-4  # for all parameters except biases and LayerNorm weights
    clip_norm: float = 0.5  # overall gradient norm bound
    evals_per_epoch: int = 7  # evaluations on every split per epoch (figure 5's samples)
    eval_batch_size: int = 64  # memes per batch at evaluation
    seed: int = 0  # seeds model init, batch order and dropout
    device: str = "auto"  # "auto", "cpu" or "cuda"
    amp: bool = False  # float16 autocast on CUDA

    def __post_init__(self):
        for name in ("batch_size", "accumulation", "evals_per_epoch", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise MamikitError(f"train config: {name} must be positive")
        if self.epochs is not None and self.epochs < 1:
            raise MamikitError("train config: epochs must be positive")
        if not 0 <= self.warmup_fraction < 1:
            raise MamikitError("train config: warmup_fraction must be in [0, 1)")


# ----------------------------------------------------------------------------- data


def experiment_tasks(experiment: Experiment, tasks_path=None) -> tuple:
    """Every task of every dataset the experiment trains on (table 1)."""
    from .data import load_tasks

    tasks = load_tasks(tasks_path)
    out = []
    for name in experiment.datasets:
        if name not in tasks:
            raise MamikitError(f"experiment {experiment.name} needs dataset {name}, which the task table does not define")
        out.extend(tasks[name])
    return tuple(out)


def prepare_data(experiment: Experiment, data_root, store, log=print) -> dict[tuple[str, str], SplitData]:
    """Join the readers' labels with the feature store's rows for each (dataset, split).

    Memes the store skipped (unreadable images) are left out and counted.
    """
    from .data import load_datasets

    split_seed = int(store.manifest.get("split_seed", 0))
    loaded = load_datasets(data_root, datasets=list(experiment.datasets), split_seed=split_seed)
    backbones = list(experiment.backbones) + ["text"]
    out = {}
    for name in experiment.datasets:
        if name not in loaded:
            raise MamikitError(f"experiment {experiment.name} needs {name} data under {data_root}, which was not found")
        ds = loaded[name]
        for split, df in ds.splits.items():
            if df is None or len(df) == 0:
                continue
            feats = store.load(name, split, backbones)
            have = set(feats.ids)
            keep = df[df["id"].isin(have)]
            missing = len(df) - len(keep)
            if missing:
                log(f"{name}/{split}: {missing} memes have no features (skipped at extraction) and are left out")
            ids = keep["id"].astype(str).tolist()
            targets = keep[list(ds.labels)].to_numpy(dtype=np.float32)
            out[(name, split)] = SplitData(name, split, ids, feats.rows(ids), targets, tuple(ds.labels), feats)
    if ("MAMI", "train") not in out:
        raise MamikitError(f"no MAMI training memes with features: check {data_root} and the feature store")
    return out


# ----------------------------------------------------------------------------- model


def build_model(experiment: Experiment, profile: Profile, store, tasks, device) -> MamiModel:
    """The architecture of figures 1-2 for this experiment, on top of the profile's text model."""
    from .features import load_text

    text = load_text(profile, "cpu")
    dims = store.dims
    cfg = ModelConfig(
        xformer_enc=experiment.xformer_enc,
        pooling=experiment.pooling,
        backbones=experiment.backbones,
        tasks=tuple(tasks),
        clip_dim=int(dims.get("clip", 640)),
        detr_dim=int(dims.get("detr", 256)),
        encoder_layers=profile.encoder_layers,
        decoder_layers=profile.decoder_layers,
        num_heads=profile.num_heads,
        ffn_dim=profile.ffn_dim,
        mlp_hidden=profile.mlp_hidden,
    )
    return MamiModel(cfg, text.model).to(device)


def _uses_cached_text(model: MamiModel) -> bool:
    # The multi variant with a frozen text encoder reads the stored hidden states
    # instead of re-running the text model on every batch.
    return model.cfg.xformer_enc == "multi" and not model.cfg.finetune_text


def _batch(model: MamiModel, experiment: Experiment, data: SplitData, index, training: bool) -> Batch:
    return make_batch(data, index, backbones=experiment.backbones, pack=True,
                      text_hidden=_uses_cached_text(model), detr_all=training and experiment.proj_align)


# ----------------------------------------------------------------------------- evaluation


@torch.no_grad()
def predict_split(model: MamiModel, experiment: Experiment, data: SplitData, batch_size: int = 64, device="cpu",
                  return_attention: bool = False, amp: bool = False) -> dict:
    """Run the model over a split.

    Returns:
        {"ids", "probs": {task: (N, k)}, and with return_attention also
        "decoder_out" (N, C, D), "queries" (C, D), "self_attn" (N, layers, C, C),
        "cross_by_encoder" (N, layers, C, E) with "encoders" naming E}.
    """
    model.eval()
    probs: dict[str, list] = {}
    extra: dict[str, list] = {"decoder_out": [], "self_attn": [], "cross_by_encoder": []}
    encoders = None
    for start in range(0, len(data), batch_size):
        batch = _batch(model, experiment, data, np.arange(start, min(start + batch_size, len(data))), False).to(device)
        with _autocast(device, amp):
            out = model(batch, return_attention=return_attention)
        for task, logits in out.logits.items():
            probs.setdefault(task, []).append(torch.sigmoid(logits.float()).cpu())
        if return_attention and out.decoder_out is not None:
            extra["decoder_out"].append(out.decoder_out.float().cpu())
            extra["self_attn"].append(torch.stack(out.self_attn, 1).float().cpu())  # (B, layers, C, C)
            encoders = list(out.memory_segments)
            extra["cross_by_encoder"].append(attention_by_encoder(out.cross_attn, out.memory_mask, out.memory_segments).cpu())
    result = {"ids": list(data.ids), "probs": {t: torch.cat(v).numpy() for t, v in probs.items()}}
    if return_attention and extra["decoder_out"]:
        result.update({k: torch.cat(v).numpy() for k, v in extra.items()})
        result["queries"] = out.queries.detach().float().cpu().numpy()
        result["encoders"] = encoders
    return result


def attention_by_encoder(cross_attn: list[torch.Tensor], memory_mask: torch.Tensor, segments: dict) -> torch.Tensor:
    """Per meme, sum each layer's cross-attention over each encoder's real memory tokens.

    Args:
        cross_attn: per decoder layer (B, C, S) head-averaged weights.
        memory_mask: (B, S) True for real tokens.
        segments: encoder -> [start, end) in the memory.
    Returns:
        (B, layers, C, E) attention mass per encoder, E in `segments` order.
    """
    att = torch.stack(cross_attn, 1) * memory_mask[:, None, None, :].to(cross_attn[0].dtype)  # (B, layers, C, S)
    return torch.stack([att[..., a:b].sum(-1) for a, b in segments.values()], -1)  # (B, layers, C, E)


def split_metrics(task, probs: np.ndarray, targets: np.ndarray) -> list[tuple[str | None, str, float]]:
    """Official score of a task and per-label score, AUC and accuracy: (label, metric, value) rows."""
    from sklearn.metrics import roc_auc_score

    pred = (probs >= 0.5).astype(int)
    gold = targets.astype(int)
    rows = [(None, "score", score_a(gold[:, 0], pred[:, 0]) if gold.shape[1] == 1 else score_b(gold, pred))]
    for j, label in enumerate(task.labels):
        rows.append((label, "score", score_a(gold[:, j], pred[:, j])))
        rows.append((label, "accuracy", float((gold[:, j] == pred[:, j]).mean())))
        if len(np.unique(gold[:, j])) == 2:
            rows.append((label, "auc", float(roc_auc_score(gold[:, j], probs[:, j]))))
    return rows


def _task_targets(task, data: SplitData) -> tuple[np.ndarray, np.ndarray]:
    """The task's target columns and the memes where all of them are known."""
    cols = [data.labels.index(label) for label in task.labels]
    t = data.targets[:, cols]
    return t, (t >= 0).all(1)


def write_predictions(path: Path, ids, task, probs: np.ndarray, targets: np.ndarray) -> None:
    """`id`, then per label the gold 0/1 (-1 unknown) and `<label>_prob`; written atomically."""
    import pandas as pd

    df = pd.DataFrame({"id": list(ids)})
    for j, label in enumerate(task.labels):
        df[label] = targets[:, j].astype(int)
        df[f"{label}_prob"] = probs[:, j]
    with atomic_write(path, "w") as fh:
        df.to_csv(fh, index=False, float_format="%.6f")


# ----------------------------------------------------------------------------- run directory


def run_is_complete(run_dir) -> bool:
    """Whether a run directory holds a finished run."""
    path = Path(run_dir) / "checkpoints" / "last" / "state.json"
    if not path.exists():
        return False
    try:
        return bool(read_json(path).get("complete"))
    except MamikitError:
        return False


def _truncate_log(path: Path, max_step: int) -> None:
    """Drop log rows written after the checkpoint a resumed run restarts from."""
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


def _write_answers(run_dir: Path, which: str, test_probs: dict[str, tuple[list, np.ndarray]]) -> None:
    """Official answer files from the Task_A head (taskA) and Task_A + Task_B heads (taskB)."""
    if "Task_A" not in test_probs:
        return
    ids, pa = test_probs["Task_A"]
    mis = (pa[:, 0] >= 0.5).astype(int)
    write_answer(run_dir / "answer" / which / "taskA" / "answer.txt", ids, mis)
    if "Task_B" in test_probs:
        ids_b, pb = test_probs["Task_B"]
        if list(ids_b) != list(ids):
            return
        write_answer(run_dir / "answer" / which / "taskB" / "answer.txt", ids, np.column_stack([mis, (pb >= 0.5).astype(int)]))


# ----------------------------------------------------------------------------- training


def _autocast(device, amp: bool):
    import contextlib

    if amp and torch.device(device).type == "cuda":
        return torch.autocast("cuda", dtype=torch.float16)
    return contextlib.nullcontext()


def _eval_points(n_batches: int, evals: int) -> set[int]:
    """Batch counts within an epoch after which to evaluate: evenly spread, the last at the epoch end."""
    return {max(1, round((k + 1) * n_batches / evals)) for k in range(evals)}


def train(experiment: Experiment | str, data_root, features_root, out_dir, profile: Profile | str = "demo",
          train_cfg: TrainConfig | None = None, resume: bool = False, progress: bool = True,
          stop_after_evals: int | None = None) -> Path:
    """Train one experiment and write its run directory (DESIGN.md "Run directory").

    Args:
        experiment: an Experiment or a paper experiment name.
        data_root: data folder with MAMI/ (and FBHM/ for multi-task).
        features_root: feature store written by `extract`.
        out_dir: the run directory.
        profile: profile name or Profile (must match the store's backbones).
        train_cfg: optimisation settings; None gives the paper's.
        resume: continue from the run's last checkpoint.
        progress: show a progress bar.
        stop_after_evals: stop (as if killed) after this many evaluations; for tests.
    Returns:
        The run directory.
    """
    from tqdm.auto import tqdm

    from .features import FeatureStore

    experiment = get_experiment(experiment) if isinstance(experiment, str) else experiment
    profile = get_profile(profile) if isinstance(profile, str) else profile
    cfg = train_cfg or TrainConfig()
    epochs = cfg.epochs or experiment.epochs
    out = Path(out_dir)
    device = pick_device(cfg.device)
    store = FeatureStore(features_root)
    tasks = experiment_tasks(experiment)
    config = {
        "experiment": dataclasses.asdict(experiment),
        "train": dict(dataclasses.asdict(cfg), epochs=epochs),
        "profile": dataclasses.asdict(profile),
        "data": str(Path(data_root).resolve()),
        "features": str(Path(features_root).resolve()),
        "tasks": [dataclasses.asdict(t) for t in tasks],
        "mamikit_version": __version__,
    }
    config = json.loads(json.dumps(config))  # the form it has when read back
    last_dir = out / "checkpoints" / "last"
    if resume and ((last_dir / "weights.safetensors").exists() or (last_dir / "state.json").exists()):
        old = read_json(out / "config.json")
        if not isinstance(old, dict) or not {"experiment", "train"} <= set(old):
            raise MamikitError(f"{out / 'config.json'}: not a mamikit run configuration")
        for key in ("experiment", "train"):
            if old[key] != config[key]:
                prev = old[key] if isinstance(old[key], dict) else {}
                changed = sorted(k for k in set(prev) | set(config[key]) if prev.get(k) != config[key].get(k))
                raise MamikitError(f"{out / 'config.json'}: the run was started with other {key} settings "
                                   f"({', '.join(changed[:4])}); use a new run directory")
        if run_is_complete(out):
            _read_checkpoint(last_dir / "weights.safetensors")  # still whole? (checksum)
            print(f"{out}: already complete")
            return out
    elif (out / "log.jsonl").exists() and not resume:
        raise MamikitError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
    else:
        resume = False
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.rglob(".*.tmp"):  # temporary files of a process killed before its rename
        stale.unlink()
    write_json(out / "config.json", config)

    seed_everything(cfg.seed)
    data = prepare_data(experiment, data_root, store)
    model = build_model(experiment, profile, store, tasks, device)
    import madgrad
    from transformers import get_linear_schedule_with_warmup

    optimizer = madgrad.MADGRAD(param_groups(model, cfg.weight_decay), lr=cfg.lr)
    sizes = {name: len(data[(name, "train")]) for name in experiment.datasets if (name, "train") in data}
    n_batches = sum(math.ceil(n / cfg.batch_size) for n in sizes.values())
    total_steps = math.ceil(n_batches / cfg.accumulation) * epochs  # section 4
    scheduler = get_linear_schedule_with_warmup(optimizer, int(total_steps * cfg.warmup_fraction), total_steps)
    scaler = torch.amp.GradScaler("cuda") if cfg.amp and device.type == "cuda" else None

    state = {"epoch": 0, "batch_in_epoch": 0, "step": 0, "evals": 0, "best": {}, "complete": False}
    if resume:
        state = load_checkpoint(last_dir, model, optimizer)
        scheduler.last_epoch = state["scheduler_last_epoch"]
        lrs = [base * lam(scheduler.last_epoch) for base, lam in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
        for g, lr in zip(optimizer.param_groups, lrs):
            g["lr"] = lr
        scheduler._last_lr = lrs  # noqa: SLF001
        if state.get("complete"):
            print(f"{out}: already complete")
            return out
        _truncate_log(out / "log.jsonl", state["step"])
    elif (out / "log.jsonl").exists():
        (out / "log.jsonl").unlink()

    eval_splits = {k: v for k, v in data.items() if v.labelled}
    bar = tqdm(total=n_batches * epochs, initial=state["step"], desc=f"train {experiment.name}", disable=not progress, leave=False)
    in_window = state["step"] % cfg.accumulation
    for epoch in range(state["epoch"], epochs):
        order = epoch_batches(sizes, cfg.batch_size, np.random.default_rng([cfg.seed, epoch]))
        points = _eval_points(len(order), cfg.evals_per_epoch)
        start = state["batch_in_epoch"] if epoch == state["epoch"] else 0
        for b in range(start, len(order)):
            name, index = order[b]
            model.train()
            batch = _batch(model, experiment, data[(name, "train")], index, True).to(device)
            ds_tasks = [t for t in tasks if t.dataset == name]
            with _autocast(device, cfg.amp):
                output = model(batch)
                loss, _ = dataset_loss(output, batch, ds_tasks, experiment.proj_align, experiment.contrastive)
            # The window's mean gradient: the last window of a run may be shorter.
            window = min(cfg.accumulation, n_batches * epochs - (state["step"] - in_window))
            loss = loss / window
            (scaler.scale(loss) if scaler else loss).backward()
            state["step"] += 1
            in_window += 1
            bar.update(1)
            fault_point("after_batch")
            if in_window == window:
                if scaler:
                    scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], cfg.clip_norm)
                if scaler:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                in_window = 0
            if b + 1 in points:
                state["epoch"], state["batch_in_epoch"] = (epoch, b + 1) if b + 1 < len(order) else (epoch + 1, 0)
                state["evals"] += 1
                state["complete"] = state["epoch"] >= epochs
                summary = _evaluate_and_save(model, experiment, tasks, eval_splits, cfg, device, out, epoch, state, optimizer, scheduler)
                bar.write(summary) if progress else print(summary)
                fault_point("after_eval")
                if stop_after_evals is not None and state["evals"] >= stop_after_evals and not state["complete"]:
                    bar.close()
                    return out
    bar.close()
    return out


def _evaluate_and_save(model, experiment, tasks, splits, cfg, device, out: Path, epoch, state, optimizer, scheduler) -> str:
    """One evaluation: log rows, last predictions, best checkpoints, answer files, last checkpoint."""
    rows, scores, test_probs, preds = [], {}, {}, {}
    for (name, split), data in splits.items():
        result = predict_split(model, experiment, data, cfg.eval_batch_size, device, amp=cfg.amp)
        for task in (t for t in tasks if t.dataset == name):
            probs = result["probs"][task.name]
            targets, known = _task_targets(task, data)
            preds[(split, task.name)] = (data.ids, task, probs, targets)
            if split == "test" and name == "MAMI":
                test_probs[task.name] = (data.ids, probs)
            if not known.any():
                continue
            for label, metric, value in split_metrics(task, probs[known], targets[known]):
                rows.append({"experiment": experiment.name, "seed": cfg.seed, "epoch": epoch, "step": state["step"],
                             "split": split, "task": task.name, "label": label, "metric": metric, "value": round(float(value), 6)})
                if label is None:
                    scores[(split, task.name)] = value
    append_jsonl(out / "log.jsonl", rows)
    fault_point("after_log")  # rows logged, checkpoint not yet saved: a resume drops and redoes them
    for (split, task_name), (ids, task, probs, targets) in preds.items():
        write_predictions(out / "predictions" / "last" / f"{split}__{task_name}.csv", ids, task, probs, targets)
    _write_answers(out, "last", test_probs)
    for task in tasks:
        dev = scores.get(("dev", task.name))
        if dev is not None and dev > state["best"].get(task.name, {}).get("dev", -1.0):
            state["best"][task.name] = {"dev": dev, "step": state["step"], "epoch": epoch}
            best = out / "checkpoints" / f"best-{task.name}"
            save_checkpoint(best, model, {"task": task.name, "step": state["step"], "epoch": epoch, "dev_score": dev})
            folder = out / "predictions" / f"best-{task.name}"
            for split in SPLITS:
                src = out / "predictions" / "last" / f"{split}__{task.name}.csv"
                if src.exists():
                    folder.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(src, folder / f".{src.name}.tmp")
                    os.replace(folder / f".{src.name}.tmp", folder / src.name)
    _write_best_answers(out, state)
    # A finished run is never resumed: its last checkpoint keeps the weights, not the optimiser's three
    # slots per parameter and the pending gradients (a quarter of the size).
    save_checkpoint(out / "checkpoints" / "last", model, state, None if state["complete"] else optimizer, scheduler)
    parts = [f"{split} {task} {v:.4f}" for (split, task), v in sorted(scores.items()) if task in ("Task_A", "Task_B", "Hateful")]
    return f"[{experiment.name} seed {cfg.seed}] epoch {epoch} step {state['step']}: " + ", ".join(parts)


def _write_best_answers(out: Path, state: dict) -> None:
    """Answer files from the best-dev predictions of Task_A (and Task_B for the sub-labels)."""
    import pandas as pd

    def probs(task, n):
        path = out / "predictions" / f"best-{task}" / f"test__{task}.csv"
        if not path.exists():
            return None
        df = pd.read_csv(path, dtype={"id": str})
        return df["id"].tolist(), df[[c for c in df.columns if c.endswith("_prob")]].to_numpy()[:, :n]

    got = {t: p for t, p in (("Task_A", probs("Task_A", 1)), ("Task_B", probs("Task_B", 4))) if p is not None}
    _write_answers(out, "best", got)


# ----------------------------------------------------------------------------- loading runs


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


def load_run(run_dir, checkpoint: str = "best", task: str = "Task_A", device="auto", features_root=None) -> LoadedRun:
    """Rebuild a run's model and load its `last` or `best-<task>` checkpoint.

    Args:
        run_dir: the run directory.
        checkpoint: "best" (best dev score of `task`) or "last".
        task: whose best checkpoint to load.
        device: where to put the model.
        features_root: the feature store, when it moved since training (default: the one in config.json).
    Returns:
        A LoadedRun.
    """
    from .data import Task
    from .features import FeatureStore

    run_dir = Path(run_dir)
    config = read_json(run_dir / "config.json")
    experiment = Experiment(**dict(config["experiment"], backbones=tuple(config["experiment"]["backbones"])))
    profile = Profile(**config["profile"])
    tasks = tuple(Task(t["name"], t["dataset"], tuple(t["labels"])) for t in config["tasks"])
    device = pick_device(device)
    store = FeatureStore(features_root or config["features"])
    model = build_model(experiment, profile, store, tasks, device)
    folder = run_dir / "checkpoints" / ("last" if checkpoint == "last" else f"best-{task}")
    if not (folder / "weights.safetensors").exists():
        raise MamikitError(f"{folder}: no checkpoint there (has the run evaluated at least once?)")
    state = load_checkpoint(folder, model)
    model.eval()
    return LoadedRun(run_dir, model, experiment, profile, config, tasks, state, device)


def cli_train(args) -> int:
    """`python -m mamikit train`: one experiment into a run directory."""
    profile = get_profile(args.profile, clip_model=args.clip_model, clip_pretrained=args.clip_pretrained,
                          detr_model=args.detr_model, text_model=args.text_model, weights=args.weights)
    fields = {"epochs": args.epochs, "seed": args.seed, "batch_size": args.batch_size, "evals_per_epoch": args.evals_per_epoch,
              "accumulation": args.accumulation, "lr": args.lr, "device": args.device, "amp": args.amp}
    cfg = TrainConfig(**{k: v for k, v in fields.items() if v is not None})
    t0 = time.time()
    out = train(args.experiment, args.data, args.features, args.out, profile=profile, train_cfg=cfg,
                resume=args.resume, progress=sys.stderr.isatty())
    print(f"run written to {out} in {time.time() - t0:.0f} s")
    return 0
