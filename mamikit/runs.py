"""The run directory: a run's model, its predictions and scores, the official answer files (section 4).

One training run writes one folder::

    config.json     every setting, resolved
    log.jsonl       one row per evaluation x split x task x metric
    predictions/    last/ and best-<task>/: <split>__<task>.csv with ids, gold labels, probabilities
    answer/         last/ and best/: taskA/answer.txt and taskB/answer.txt in the official format
    checkpoints/    last/ and best-<task>/: weights.safetensors + state.json (mamikit.checkpoints);
                    a finished run keeps the weights its keep_weights names, and last/state.json

The training loop (`mamikit.train`) fills it through :func:`record_evaluation`;
prediction, figures and reports read it through :func:`load_run` and
:func:`predict_split`, so none of them needs the loop. Section 4's evaluation
is here too: every task and label on every split, scored as the official
scorer does (:func:`split_metrics`). docs/design.md "Run directory" describes
each file.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .batching import SplitData, make_batch
from .checkpoints import check_finished, kept_checkpoints, keeping, load_checkpoint, save_checkpoint
from .data import SPLITS
from .experiments import Experiment
from .metrics import score_a, score_b, write_answer
from .model import Batch, MamiModel, ModelConfig
from .profiles import Profile
from .registry import Task, official_task_names, official_tasks, primary_dataset
from .utils import MamikitError, append_jsonl, atomic_write, fault_point, get_logger, pick_device, read_json, write_json

log = get_logger(__name__)

CONFIG_FILE = "config.json"  # every setting of the run, resolved
LOG_FILE = "log.jsonl"  # one row per evaluation x split x task x metric
THRESHOLD = 0.5  # probability from which a label is predicted positive (logged scores and answer files)


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
            if old[key] != config[key]:
                prev = old[key] if isinstance(old[key], dict) else {}
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


def load_run(run_dir, checkpoint: str = "best", task: str | None = None, device="auto", features_root=None) -> LoadedRun:
    """Rebuild a run's model and load its `last` or `best-<task>` checkpoint.

    Args:
        run_dir: the run directory.
        checkpoint: "best" (best dev score of `task`) or "last".
        task: whose best checkpoint to load (default: the official Task A, data/tasks.json).
        device: where to put the model.
        features_root: the feature store, when it moved since training (default: the one in config.json).
    Returns:
        A LoadedRun.
    """
    from .store import FeatureStore

    run_dir = Path(run_dir)
    config = read_json(run_dir / CONFIG_FILE)
    experiment = Experiment.from_dict(config["experiment"])
    profile = Profile(**config["profile"])
    tasks = tuple(Task(t["name"], t["dataset"], tuple(t["labels"])) for t in config["tasks"])
    device = pick_device(device)
    store = FeatureStore(features_root or config["features"])
    model = build_model(experiment, profile, store.dims, tasks, device, store.special_ids)
    task = task or official_task_names()[0]
    folder = checkpoint_folder(run_dir, "last" if checkpoint == "last" else f"best-{task}")
    state = load_checkpoint(folder, model)
    model.eval()
    return LoadedRun(run_dir, model, experiment, profile, config, tasks, state, device)


def checkpoint_folder(run_dir, name: str, purpose: str = "") -> Path:
    """`<run_dir>/checkpoints/<name>` (`last` or `best-<task>`) when it holds weights; else MamikitError saying why not.

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
        raise MamikitError(f"{folder}: {need}no checkpoint there, though keep_weights={recorded!r} keeps it (deleted?)")
    raise MamikitError(f"{run_dir}: {need}the finished run kept no `{name}` weights (keep_weights={recorded!r}); "
                       f"keep_weights {' or '.join(map(repr, keeping(name)))} keeps them")


def uses_cached_text(model: MamiModel) -> bool:
    """Whether the model reads the stored text states instead of running its text model.

    The multi variant with a frozen text encoder does, on every batch of
    training and prediction alike.
    """
    return model.cfg.xformer_enc == "multi" and not model.cfg.finetune_text and not model.shares_text_embeddings()


def batch_for(model: MamiModel, experiment: Experiment, data: SplitData, index, training: bool) -> Batch:
    """The batch `model` reads for rows `index` of `data`: packed; all DETR queries when eq. 2 trains."""
    # While training with the text model's dropout on, the cached (dropout-free) states are not read.
    cached = uses_cached_text(model) and not (training and model.cfg.text_dropout_in_train)
    return make_batch(data, index, image_encoders=experiment.image_encoders, pack=True,
                      text_hidden=cached, detr_all=training and experiment.proj_align)


def autocast(device, amp: bool):
    """Mixed-precision autocast on CUDA when `amp` (bf16 where supported, else fp16), else nothing."""
    import contextlib

    from .utils import amp_dtype

    if amp and torch.device(device).type == "cuda":
        return torch.autocast("cuda", dtype=amp_dtype())
    return contextlib.nullcontext()


# ----------------------------------------------------------------------------- predicting and scoring a split


def memory_lengths(experiment: Experiment, data: SplitData) -> np.ndarray:
    """Per meme, the tokens its packed batch row holds: real text tokens plus kept DETR queries."""
    f = data.features
    offsets = f.text_offsets.numpy()
    lengths = offsets[data.rows + 1] - offsets[data.rows]
    if "detr" in experiment.image_encoders:
        lengths = lengths + f.detr_mask[torch.from_numpy(data.rows)].sum(1).numpy()
    return lengths


def predict_split(model: MamiModel, experiment: Experiment, data: SplitData, batch_size: int = 64, device="cpu",
                  return_attention: bool = False, amp: bool = False, workers: int | None = None) -> dict:
    """Run the model over a split, in eval mode and without autograd.

    The memes go through in order of their packed length (`memory_lengths`),
    so that a batch pads its text and DETR tokens to about its memes' own
    length; every meme's outputs are its own (padding is masked), and come
    back in the split's order. On the CPU the batches are shared out to
    `workers` threads (`map_batches`; default: PyTorch's thread count), each
    batch on one core.

    Returns:
        {"ids", "probs": {task: (N, k)}, and with return_attention also
        "decoder_out" (N, R, D), "decoder_rows" (the R (task, label) pairs of the
        decoder's rows, `ModelOutput.decoder_rows`), "queries" (C, D) with
        "labels" naming C, "self_attn" (N, layers, R, R), "cross_by_encoder"
        (N, layers, R, E) with "encoders" naming E}.
    """
    model.eval()
    order = np.argsort(memory_lengths(experiment, data), kind="stable")

    def run(start: int) -> tuple[dict, dict, dict]:
        with torch.inference_mode():
            batch = batch_for(model, experiment, data, order[start:start + batch_size], False).to(device)
            with autocast(device, amp):
                out = model(batch, return_attention=return_attention)
            probs = {task: torch.sigmoid(logits.float()).cpu() for task, logits in out.logits.items()}
            extra, meta = {}, {}
            if return_attention and out.decoder_out is not None:
                extra = {"decoder_out": out.decoder_out.float().cpu(),
                         "self_attn": torch.stack(out.self_attn, 1).float().cpu(),  # (B, layers, C, C)
                         "cross_by_encoder": attention_by_encoder(out.cross_attn, out.memory_mask,
                                                                  out.memory_segments).cpu()}
                meta = {"queries": out.queries.detach().float().cpu().numpy(), "labels": list(model.labels),
                        "decoder_rows": list(out.decoder_rows), "encoders": list(out.memory_segments)}
        return probs, extra, meta

    pieces = map_batches(run, range(0, len(data), batch_size), device, workers)

    def in_split_order(parts: list[torch.Tensor]) -> np.ndarray:
        values = torch.cat(parts).numpy()
        placed = np.empty_like(values)
        placed[order] = values
        return placed

    result = {"ids": list(data.ids),
              "probs": {t: in_split_order([p[t] for p, _, _ in pieces]) for t in (pieces[0][0] if pieces else {})}}
    if return_attention and pieces and pieces[0][1]:
        result.update({k: in_split_order([e[k] for _, e, _ in pieces]) for k in pieces[0][1]})
        result.update(pieces[-1][2])
    return result


def map_batches(fn, starts, device="cpu", workers: int | None = None) -> list:
    """``[fn(s) for s in starts]``; on the CPU the calls are shared out to `workers` threads, each PyTorch-single-threaded.

    An evaluation's forward passes are independent, and a batch's many small
    operations (ten decoder rows per meme, a few real tokens per encoder)
    keep a core busy on their own better than two cores that meet at every
    operation: 10-20% faster on 2 cores (``bench/epoch_time.py``). The
    numbers are those of one batch at a time, up to the float rounding of a
    thread count (a few 1e-7). PyTorch's thread count is process-wide: it is
    1 while the threads run and restored after. Results come back in the
    order of `starts`; they are started from the last (an evaluation's longest
    batches), so that no thread is left with a long batch at the end.
    """
    starts = list(starts)
    workers = min(workers or torch.get_num_threads(), len(starts))
    if torch.device(device).type != "cpu" or workers < 2:
        return [fn(s) for s in starts]
    from concurrent.futures import ThreadPoolExecutor

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(workers, thread_name_prefix="mamikit-eval") as pool:
            return list(pool.map(fn, starts[::-1]))[::-1]
    finally:
        torch.set_num_threads(threads)


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

    pred = (probs >= THRESHOLD).astype(int)
    gold = targets.astype(int)
    rows = [(None, "score", score_a(gold[:, 0], pred[:, 0]) if gold.shape[1] == 1 else score_b(gold, pred))]
    for j, label in enumerate(task.labels):
        rows.append((label, "score", score_a(gold[:, j], pred[:, j])))
        rows.append((label, "accuracy", float((gold[:, j] == pred[:, j]).mean())))
        if len(np.unique(gold[:, j])) == 2:
            rows.append((label, "auc", float(roc_auc_score(gold[:, j], probs[:, j]))))
    return rows


def task_targets(task, data: SplitData) -> tuple[np.ndarray, np.ndarray]:
    """The task's target columns and the memes where all of them are known."""
    cols = [data.labels.index(label) for label in task.labels]
    t = data.targets[:, cols]
    return t, (t >= 0).all(1)


# ----------------------------------------------------------------------------- predictions and answer files


def write_predictions(path: Path, ids, task, probs: np.ndarray, targets: np.ndarray) -> None:
    """`id`, then per label the gold 0/1 (-1 unknown) and `<label>_prob`; written atomically."""
    import pandas as pd

    df = pd.DataFrame({"id": list(ids)})
    for j, label in enumerate(task.labels):
        df[label] = targets[:, j].astype(int)
        df[f"{label}_prob"] = probs[:, j]
    with atomic_write(path, "w") as fh:
        df.to_csv(fh, index=False, float_format="%.6f")


def write_answers(run_dir: Path, which: str, test_probs: dict[str, tuple[list, np.ndarray]]) -> None:
    """Official answer files: taskA from the official Task A head, taskB from Task A's then Task B's heads.

    Which tasks are the official ones is declared in data/tasks.json (`official`).
    """
    official = official_tasks()
    if "A" not in official or official["A"].name not in test_probs:
        return
    ids, pa = test_probs[official["A"].name]
    first = (pa[:, 0] >= THRESHOLD).astype(int)
    write_answer(run_dir / "answer" / which / "taskA" / "answer.txt", ids, first)
    if "B" in official and official["B"].name in test_probs:
        ids_b, pb = test_probs[official["B"].name]
        if list(ids_b) != list(ids):
            return
        write_answer(run_dir / "answer" / which / "taskB" / "answer.txt", ids, np.column_stack([first, (pb >= THRESHOLD).astype(int)]))


def write_best_answers(run_dir: Path) -> None:
    """Answer files from the best-dev predictions of the official tasks."""
    import pandas as pd

    got = {}
    for task in official_tasks().values():
        path = run_dir / "predictions" / f"best-{task.name}" / f"test__{task.name}.csv"
        if path.exists():
            df = pd.read_csv(path, dtype={"id": str})
            got[task.name] = df["id"].tolist(), df[[f"{label}_prob" for label in task.labels]].to_numpy()
    write_answers(run_dir, "best", got)


# ----------------------------------------------------------------------------- one evaluation


class RunningPredictions:
    """The training splits' probabilities from each batch's own training forward pass, since the epoch began.

    Section 4's train-split scores as the authors computed them (docs/fidelity.md
    row 17): no extra pass over the training split. Kept on the model's device
    until scored, so that collecting them costs no transfer.
    """

    def __init__(self, tensors: dict[str, torch.Tensor] | None = None, device="cpu"):
        """Empty, or rebuilt from `tensors()` (a checkpoint's copy)."""
        self.index: dict[str, list] = {}  # dataset -> positions in its training split, batch by batch
        self.probs: dict[str, list] = {}  # task -> (B, k) float32, batch by batch, in its dataset's `index` order
        for key, value in sorted((tensors or {}).items()):
            kind, name = key.split(".", 1)
            if kind == "index":
                self.index[name] = [value.numpy().astype(np.int64)]
            else:
                self.probs[name] = [value.float().to(device)]

    def add(self, dataset: str, index, probs: dict[str, torch.Tensor]) -> None:
        """One batch: its positions in `dataset`'s training split and {task: (B, k) probabilities}."""
        self.index.setdefault(dataset, []).append(np.asarray(index, dtype=np.int64))
        for task, p in probs.items():
            self.probs.setdefault(task, []).append(p.detach().float())

    def split(self, dataset: str, tasks) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """(positions seen, ascending; {task: (n, k) probabilities in that order}) for `dataset`'s tasks."""
        index = np.concatenate(self.index.get(dataset) or [np.zeros(0, dtype=np.int64)])
        order = np.argsort(index, kind="stable")
        probs = {t.name: torch.cat(self.probs[t.name]).cpu().numpy()[order] for t in tasks if self.probs.get(t.name)}
        return index[order], probs

    def tensors(self) -> dict[str, torch.Tensor]:
        """Flat named CPU tensors, for a checkpoint."""
        out = {f"index.{d}": torch.from_numpy(np.concatenate(v)) for d, v in self.index.items() if v}
        return out | {f"probs.{t}": torch.cat(v).cpu() for t, v in self.probs.items() if v}


def record_evaluation(run_dir: Path, model: MamiModel, experiment: Experiment, tasks, splits: dict, *, seed: int,
                      epoch: int, step: int, best: dict, batch_size: int = 64, device="cpu", amp: bool = False,
                      running: RunningPredictions | None = None, best_weights: dict[str, Path] | None = None) -> str:
    """Score every task on every split and write what an evaluation leaves in the run directory.

    Each split goes through `predict_split` (log rows with source "full"),
    except, when `running` is given, the training splits: they are scored
    from the running training predictions of the epoch (source "running";
    their predictions files then hold the memes seen so far).
    Appends the log rows, replaces the `last` predictions and answer files, and
    where a task's dev score beats `best` (task -> {"dev", "step", "epoch"},
    updated in place) saves its best predictions and answer files, and its best
    checkpoint in `best_weights[task]` (task -> folder; a task left out saves no
    weights; None: every task's under the run's checkpoints/).
    The `last` checkpoint is the caller's (it holds the loop's state).

    Returns:
        A one-line summary of the official scores.
    """
    primary = primary_dataset()
    rows, scores, test_probs, preds = [], {}, {}, {}
    for (name, split), data in splits.items():
        own = [t for t in tasks if t.dataset == name]
        source = "running" if running is not None and split == "train" else "full"
        if source == "running":
            seen, result = running.split(name, own)
            ids = [data.ids[i] for i in seen]
        else:
            seen, result = slice(None), predict_split(model, experiment, data, batch_size, device, amp=amp)["probs"]
            ids = data.ids
        for task in (t for t in own if t.name in result):
            probs = result[task.name]
            targets, known = task_targets(task, data)
            targets, known = targets[seen], known[seen]
            preds[(split, task.name)] = (ids, task, probs, targets)
            if split == "test" and name == primary:
                test_probs[task.name] = (ids, probs)
            if not known.any():
                continue
            for label, metric, value in split_metrics(task, probs[known], targets[known]):
                rows.append({"experiment": experiment.name, "seed": seed, "epoch": epoch, "step": step, "split": split,
                             "source": source, "task": task.name, "label": label, "metric": metric,
                             "value": round(float(value), 6)})
                if label is None:
                    scores[(split, task.name)] = value
    append_jsonl(run_dir / LOG_FILE, rows)
    fault_point("after_log")  # rows logged, checkpoint not yet saved: a resume drops and redoes them
    for (split, task_name), (ids, task, probs, targets) in preds.items():
        write_predictions(run_dir / "predictions" / "last" / f"{split}__{task_name}.csv", ids, task, probs, targets)
    write_answers(run_dir, "last", test_probs)
    for task in tasks:
        dev = scores.get(("dev", task.name))
        if dev is not None and dev > best.get(task.name, {}).get("dev", -1.0):
            best[task.name] = {"dev": dev, "step": step, "epoch": epoch}
            folder = run_dir / "checkpoints" / f"best-{task.name}" if best_weights is None else best_weights.get(task.name)
            if folder is not None:
                save_checkpoint(folder, model, {"task": task.name, "step": step, "epoch": epoch, "dev_score": dev})
            folder = run_dir / "predictions" / f"best-{task.name}"
            for split in SPLITS:
                src = run_dir / "predictions" / "last" / f"{split}__{task.name}.csv"
                if src.exists():
                    folder.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(src, folder / f".{src.name}.tmp")
                    os.replace(folder / f".{src.name}.tmp", folder / src.name)
    write_best_answers(run_dir)
    shown = set(official_task_names()) | {t.name for t in tasks if t.dataset != primary}
    parts = [f"{split} {task} {v:.4f}" for (split, task), v in sorted(scores.items()) if task in shown]
    return f"[{experiment.name} seed {seed}] epoch {epoch} step {step}: " + ", ".join(parts)


# ----------------------------------------------------------------------------- the run's data


def prepare_data(experiment: Experiment, data_root, store) -> dict[tuple[str, str], SplitData]:
    """Join the readers' labels with the feature store's rows for each (dataset, split).

    Memes the store skipped (unreadable images) are left out and counted.
    The authors' split (``experiment.authors_split``) reads train and dev
    from the store's train and dev files together.
    """
    from .batching import pool_features, text_length_note
    from .data import load_datasets

    split_seed = int(store.manifest.get("split_seed", 0))
    loaded = load_datasets(data_root, datasets=list(experiment.datasets), split_seed=split_seed,
                           authors_split=experiment.authors_split)
    backbones = list(experiment.image_encoders) + ["text"]
    out = {}
    for name in experiment.datasets:
        if name not in loaded:
            raise MamikitError(f"experiment {experiment.name} needs {name} data under {data_root}, which was not found")
        ds = loaded[name]
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
                log.info("%s/%s: %d memes have no features (skipped at extraction) and are left out", name, split, missing)
            ids = keep["id"].astype(str).tolist()
            targets = keep[list(ds.labels)].to_numpy(dtype=np.float32)
            out[(name, split)] = SplitData(name, split, ids, feats.rows(ids), targets, tuple(ds.labels), feats)
    primary = primary_dataset()
    if (primary, "train") not in out:
        raise MamikitError(f"no {primary} training memes with features: check {data_root} and the feature store")
    note = text_length_note(out, store.manifest.get("backbones", {}).get("text", {}).get("max_tokens"), experiment.text_tokens)
    if note:
        log.warning("%s", note)
    return out
