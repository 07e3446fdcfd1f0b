"""Section 4's evaluation: a model over a split, its scores, predictions and answer files (mamikit.runs' folder).

Every task and label on every split, scored as the official scorer does
(:func:`split_metrics`); each evaluation of a training run appends its rows to
the run's log, writes the split's predictions and the test answer files, and
keeps a task's best checkpoint (:func:`record_evaluation`). :func:`predict_split`
runs a trained model over a split for figures, reports and prediction as well.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import torch

from .batching import SplitData, make_batch
from .checkpoints import save_checkpoint
from .data import SPLITS
from .experiments import Experiment
from .metrics import score_a, score_b, write_answer
from .model import Batch, MamiModel
from .registry import official_task_names, official_tasks, primary_dataset
from .runs import LOG_FILE
from .utils import append_jsonl, atomic_write, fault_point, get_logger, stage_bar

log = get_logger(__name__)

THRESHOLD = 0.5  # probability from which a label is predicted positive (logged scores and answer files)
# On a GPU an evaluation batch is bound by launching its operators, not by its arithmetic: batches of at least
# this many memes (sorted by length, so padded little); the CPU's one batch per core (`map_batches`) is not for it.
DEVICE_EVAL_BATCH = 256


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
    """Per meme, the tokens its packed batch row holds: real text tokens plus kept DETR queries (those it has)."""
    f = data.features
    lengths = np.zeros(len(data.rows), dtype=np.int64)
    if "text" in data.modalities:
        offsets = f.text_offsets.numpy()
        lengths = offsets[data.rows + 1] - offsets[data.rows]
    if "detr" in experiment.image_encoders and "image" in data.modalities:
        lengths = lengths + f.detr_mask[torch.from_numpy(data.rows)].sum(1).numpy()
    return lengths


def predict_split(model: MamiModel, experiment: Experiment, data: SplitData, batch_size: int = 64, device="cpu",
                  return_attention: bool = False, amp: bool = False, workers: int | None = None) -> dict:
    """Run the model over a split, in eval mode and without autograd.

    The memes go through in order of their packed length (`memory_lengths`),
    so that a batch pads its text and DETR tokens to about its memes' own
    length; every meme's outputs are its own (padding is masked), and come
    back in the split's order. On a GPU batches hold at least
    `DEVICE_EVAL_BATCH` memes. On the CPU the batches are shared out to
    `workers` threads (`map_batches`; default: PyTorch's thread count), each
    batch on one core. Inside a round's progress view (`utils.progress_view`)
    a bar counts the memes done.

    Returns:
        {"ids", "probs": {task: (N, k)}, and with return_attention also
        "decoder_out" (N, R, D), "decoder_rows" (the R (task, label) pairs of the
        decoder's rows, `ModelOutput.decoder_rows`), "queries" (C, D) with
        "labels" naming C, "self_attn" (N, layers, R, R), "cross_by_encoder"
        (N, layers, R, E) with "encoders" naming E}.
    """
    model.eval()
    if torch.device(device).type != "cpu":
        batch_size = max(batch_size, DEVICE_EVAL_BATCH)  # the same outputs up to float rounding (padding is masked)
    order = np.argsort(memory_lengths(experiment, data), kind="stable")

    def run(start: int) -> tuple[dict, dict, dict]:
        with torch.inference_mode():
            batch = batch_for(model, experiment, data, order[start:start + batch_size], False).to(device)
            with autocast(device, amp):
                out = model(batch, return_attention=return_attention)
            probs = {task: _on_host(torch.sigmoid(logits if logits.dtype == torch.float32 else logits.float()))
                     for task, logits in out.logits.items()}
            extra, meta = {}, {}
            if return_attention and out.decoder_out is not None:
                extra = {"decoder_out": out.decoder_out.float().cpu(),
                         "self_attn": torch.stack(out.self_attn, 1).float().cpu(),  # (B, layers, C, C)
                         "cross_by_encoder": attention_by_encoder(out.cross_attn, out.memory_mask,
                                                                  out.memory_segments).cpu()}
                meta = {"queries": out.queries.detach().float().cpu().numpy(), "labels": list(model.labels),
                        "decoder_rows": list(out.decoder_rows), "encoders": list(out.memory_segments)}
        return probs, extra, meta

    with stage_bar("evaluate", len(data), "meme") as advance:  # shown inside a round's progress view only

        def run_counted(start: int) -> tuple[dict, dict, dict]:
            out = run(start)
            advance(min(batch_size, len(data) - start))
            return out

        pieces = map_batches(run_counted, range(0, len(data), batch_size), device, workers)

    def in_split_order(parts: list[torch.Tensor]) -> np.ndarray:
        values = (parts[0] if len(parts) == 1 else torch.cat(parts)).numpy()
        placed = np.empty_like(values)
        placed[order] = values
        return placed

    result = {"ids": list(data.ids),
              "probs": {t: in_split_order([p[t] for p, _, _ in pieces]) for t in (pieces[0][0] if pieces else {})}}
    if return_attention and pieces and pieces[0][1]:
        result.update({k: in_split_order([e[k] for _, e, _ in pieces]) for k in pieces[0][1]})
        result.update(pieces[-1][2])
    return result


def _on_host(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` on the CPU; one there already is returned without dispatching a copy's operator."""
    return tensor if tensor.device.type == "cpu" else tensor.cpu()


def map_batches(fn, starts, device="cpu", workers: int | None = None) -> list:
    """``[fn(s) for s in starts]``; on the CPU the calls are shared out to `workers` threads, each
    PyTorch-single-threaded.

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

    Which tasks are the official ones is declared in mamikit/tasks.json (`official`).
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
        write_answer(run_dir / "answer" / which / "taskB" / "answer.txt", ids,
                     np.column_stack([first, (pb >= THRESHOLD).astype(int)]))


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
            folder = (run_dir / "checkpoints" / f"best-{task.name}" if best_weights is None
                      else best_weights.get(task.name))
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
