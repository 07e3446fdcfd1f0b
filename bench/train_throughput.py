"""Training throughput of experiment 30 at the paper's sizes: the straightforward path against mamikit's (section 4).

Section 4 trained on one P100 and pre-computed the frozen backbones' outputs to
make that affordable. This benchmark builds experiment 30 (multi encoders,
class-query decoder, projection alignment, MAMI + FBHM tasks, CLIP + DETR) at
the `paper` sizes with random weights -- hidden 768, 6-layer 8-head image
encoders and decoder, a BERT-base text encoder from a transformers
``BertConfig`` (nothing downloaded), CLIP 640-d, DETR 256-d -- on synthetic
memes shaped like MAMI's (DETR keeps about one query in ten; text lengths
log-normal around 30 tokens, clipped to [5, 120]). It runs the same optimiser
steps two ways:

- reference: the straightforward implementation. One file read per meme,
  every batch padded to 100 DETR queries and 120 text tokens
  (``make_batch(pack=False)``), the frozen text encoder run on every batch,
  and the model's encoders and decoder called as stock PyTorch modules on
  those padded sequences (``ModelConfig(fast_path=False)``).
- mamikit: what ``train.py`` does. The memory-mapped feature store, batches
  packed to their kept DETR queries and real text tokens
  (``make_batch(pack=True)``), the text encoder's states read from the store,
  the image encoders run on real tokens only and the decoder's key/value
  projections folded into its class queries (``ModelConfig(fast_path=True)``:
  ``fastpath.packed_encoder``, ``fastpath.folded_cross_attention``).

Both paths start from the same weights (built from the same seed; checked),
see the same batches (``epoch_batches`` order, both datasets interleaved), go
through ``train.train_step`` (forward, loss with train.py's per-label
``pos_weight``, backward) and take MADGRAD steps with gradient clipping: the
``madgrad`` package on the reference path, ``mamikit.optim.MADGRAD`` (the same
update as multi-tensor operations) on mamikit's, as ``train.py``. The
learning rate is held at the paper's peak 2e-4 (the warm-up schedule only scales
it) and dropout is off by default, so that the two paths' losses can be
compared step by step. Each path runs in its own subprocess so that its peak
memory is its own.

Every batch is followed by an optimiser step, and the two are timed apart:
a batch (read, assemble, forward, backward) and a step (clip + MADGRAD). The
optimiser's arithmetic is the same on both paths and does not depend on the batch.
The headline samples/s is for the paper's training, one step per 20 batches
(``--accumulation``): batch / (t_batch + t_step / 20) from the measured
medians; the figures with a step after every batch are printed beside it.

    python bench/train_throughput.py --quick          # 1 small warm-up + 3 timed steps per path, batch 16
    python bench/train_throughput.py --steps 10 --profile
    python bench/train_throughput.py --device cuda --amp

The last line printed is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from mamikit.backbones import NUM_DETR_LOGITS, NUM_DETR_QUERIES, detr_object_mask
from mamikit.batching import SplitData, epoch_batches, make_batch
from mamikit.data import dataset_labels
from mamikit.store import FeatureStore, SplitFeatures, write_split

CLIP_DIM, DETR_DIM, DETR_QUERIES, DETR_LOGITS = 640, 256, NUM_DETR_QUERIES, NUM_DETR_LOGITS
MAX_TEXT = 120  # section 3.1: at most 120 tokens
CLS, SEP = 101, 102  # bert-base-uncased's [CLS] and [SEP]
LR, WEIGHT_DECAY, CLIP_NORM = 2e-4, 5e-4, 0.5  # section 4
ACCUMULATION = 20  # section 4: gradients accumulated over 20 batches per optimiser step


# ----------------------------------------------------------------------------- model


def build_text_model(seed: int = 0):
    """A bert-base-sized BertModel (as the hatexplain BERT of the paper) with random weights, from `seed`."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    return BertModel(BertConfig()).eval()  # with its pooler: the paper recipe uses it (docs/fidelity.md row 6)


def build_model(dropout: float, fast_path: bool, seed: int = 0):
    """Experiment 30 at paper sizes with random weights (same seed -> same weights) -> (model, experiment).

    `fast_path` False is the straightforward reference: stock PyTorch modules over the padded sequences.
    """
    from mamikit.experiments import experiment_tasks, get_experiment
    from mamikit.model import MamiModel, ModelConfig
    from mamikit.profiles import get_profile

    exp = get_experiment("30")
    text = build_text_model(seed)
    cfg = ModelConfig.from_experiment(exp, get_profile("paper"), {"clip": CLIP_DIM, "detr": DETR_DIM},
                                      experiment_tasks(exp), dropout=dropout, fast_path=fast_path)
    torch.manual_seed(seed + 1)
    return MamiModel(cfg, text), exp


def _fingerprint(model) -> str:
    """A digest of every parameter and buffer (sampled), to check that both paths start from the same weights."""
    h = hashlib.sha1()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().reshape(-1)[::997].float().cpu().numpy().tobytes())
    return h.hexdigest()


# ----------------------------------------------------------------------------- synthetic memes


def _text_lengths(rng: np.random.Generator, n: int) -> np.ndarray:
    # MAMI captions: most well under 120 tokens; log-normal around 30, [CLS]/[SEP] included.
    return np.clip(np.round(rng.lognormal(math.log(30), 0.6, n)), 5, MAX_TEXT).astype(np.int64)


def _detr_logits(rng: np.random.Generator, n: int) -> np.ndarray:
    """(n, 100, 92) logits where about one query in ten is an object (arg-max not the no-object class)."""
    logits = rng.normal(0.0, 1.0, (n, DETR_QUERIES, DETR_LOGITS)).astype(np.float32)
    obj = rng.random((n, DETR_QUERIES)) < 0.1
    cls = rng.integers(0, DETR_LOGITS - 1, (n, DETR_QUERIES))
    winner = np.where(obj, cls, DETR_LOGITS - 1)  # last logit = no object
    np.put_along_axis(logits, winner[..., None], 6.0, axis=-1)
    return logits


@torch.no_grad()
def _text_states(text_model, ids: list[np.ndarray], batch: int = 32) -> list[np.ndarray]:
    """The frozen text encoder's states of each meme (what `extract` stores), float32."""
    out: list[np.ndarray | None] = [None] * len(ids)
    order = np.argsort([len(x) for x in ids], kind="stable")  # similar lengths together: little padding
    for start in range(0, len(ids), batch):
        chunk = order[start:start + batch]
        t = max(len(ids[i]) for i in chunk)
        tok = torch.zeros(len(chunk), t, dtype=torch.long)
        mask = torch.zeros(len(chunk), t, dtype=torch.long)
        for j, i in enumerate(chunk):
            tok[j, :len(ids[i])], mask[j, :len(ids[i])] = torch.from_numpy(ids[i].astype(np.int64)), 1
        hidden = text_model(input_ids=tok, attention_mask=mask).last_hidden_state  # (b, t, D)
        for j, i in enumerate(chunk):
            out[i] = hidden[j, :len(ids[i])].numpy()
    return out


def make_memes(text_model, sizes: dict[str, int], seed: int, dtype=np.float16) -> dict[str, dict]:
    """Synthetic stored features per dataset (floats in `dtype`): ids, clip, detr embeds/logits/mask, text ids/states, targets."""
    rng = np.random.default_rng(seed)
    data = {}
    for ds, n in sizes.items():
        lengths = _text_lengths(rng, n)
        ids = [np.concatenate([[CLS], rng.integers(1000, 30000, k - 2), [SEP]]).astype(np.int32) for k in lengths]
        logits = _detr_logits(rng, n)
        labels = dataset_labels(ds)
        targets = (rng.random((n, len(labels))) < 0.4).astype(np.float32)
        if ds == "MAMI":
            targets[:, 1:] *= targets[:, :1]  # sub-labels only on misogynous memes
        data[ds] = {
            "ids": [f"{ds.lower()}{i:06d}" for i in range(n)],
            "clip": rng.normal(0, 1, (n, 5, CLIP_DIM)).astype(dtype),
            "detr": rng.normal(0, 1, (n, DETR_QUERIES, DETR_DIM)).astype(dtype),
            "detr_logits": logits.astype(dtype),
            "detr_mask": detr_object_mask(torch.from_numpy(logits)).numpy().astype(np.uint8),
            "text_ids": ids,
            "text_hidden": [h.astype(dtype) for h in _text_states(text_model, ids)],
            "targets": targets,
            "labels": labels,
        }
    return data


def write_store(root: Path, memes: dict[str, dict], split: str = "train") -> int:
    """The memes as a feature store in the layout `extract` writes, as `split` -> bytes written."""
    total = 0
    for ds, m in memes.items():
        lengths = np.array([len(x) for x in m["text_ids"]])
        arrays = {
            "clip": {"embeds": m["clip"]},
            "detr": {"embeds": m["detr"], "logits": m["detr_logits"], "mask": m["detr_mask"]},
            "text": {"input_ids": np.concatenate(m["text_ids"]),
                     "hidden": np.concatenate(m["text_hidden"]),
                     "offsets": np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)},
        }
        total += write_split(root, ds, split, m["ids"], arrays, profile="paper")
    return total


def write_meme_files(root: Path, memes: dict[str, dict]) -> int:
    """The straightforward layout: one small safetensors file per meme -> bytes written."""
    from safetensors.numpy import save_file

    total = 0
    for ds, m in memes.items():
        (root / ds).mkdir(parents=True, exist_ok=True)
        for i, meme_id in enumerate(m["ids"]):
            path = root / ds / f"{meme_id}.safetensors"
            save_file({"clip": m["clip"][i], "detr": m["detr"][i], "detr_mask": m["detr_mask"][i],
                       "input_ids": m["text_ids"][i]}, str(path))
            total += path.stat().st_size
    return total


# ----------------------------------------------------------------------------- the two batch sources


class MemeFiles:
    """Reference batches: read each meme's own file, then the padded layout of `make_batch(pack=False)`."""

    def __init__(self, root: Path, ds: str, ids: list[str], targets: np.ndarray, labels: tuple):
        self.root, self.ds, self.ids, self.targets, self.labels = root, ds, ids, targets, labels

    def batch(self, index: np.ndarray):
        from safetensors.torch import load_file

        memes = [load_file(str(self.root / self.ds / f"{self.ids[i]}.safetensors")) for i in index]  # one read per meme
        lengths = torch.tensor([len(m["input_ids"]) for m in memes])
        feats = SplitFeatures(
            ids=[self.ids[i] for i in index],
            clip=torch.stack([m["clip"] for m in memes]),
            detr=torch.stack([m["detr"] for m in memes]),
            detr_mask=torch.stack([m["detr_mask"].bool() for m in memes]),
            text_ids=torch.cat([m["input_ids"] for m in memes]),
            text_offsets=torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]),
        )
        local = SplitData(self.ds, "train", feats.ids, np.arange(len(index)), self.targets[index], self.labels, feats)
        return make_batch(local, np.arange(len(index)), pack=False, text_hidden=False, detr_all=True,
                          max_text_tokens=MAX_TEXT)


class Store:
    """mamikit's batches: slices of the memory-mapped store, packed, with the cached text states (as train.py)."""

    def __init__(self, root: Path, ds: str, ids: list[str], targets: np.ndarray, labels: tuple, split: str = "train"):
        feats = FeatureStore(root).load(ds, split, ("clip", "detr", "text"))
        self.data = SplitData(ds, split, ids, feats.rows(ids), targets, labels, feats)

    def batch(self, index: np.ndarray):
        return make_batch(self.data, index, pack=True, text_hidden=True, detr_all=True)


# ----------------------------------------------------------------------------- one path (subprocess)


def _rss_now() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss() -> int:
    """This process's resident high-water mark (VmHWM; ru_maxrss where /proc has none)."""
    try:
        with open("/proc/self/status") as fh:
            return next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def _reset_peak_rss() -> bool:
    """Lower the high-water mark to the current RSS (Linux clear_refs 5); False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_path(work: Path, path: str, device_name: str, amp: bool, dropout: float, profile: bool,
             count_flops: bool) -> dict:
    """Train the planned batches along one path; times, losses, memory, FLOPs and a profile."""
    import madgrad

    from mamikit.losses import label_pos_weights
    from mamikit.model import param_groups
    from mamikit.optim import MADGRAD
    from mamikit.train import optimizer_step
    from mamikit.train import train_step

    t_setup = time.perf_counter()
    device = torch.device(device_name)
    plan = json.loads((work / "plan.json").read_text())
    # The reference runs the model's encoders and decoder as stock PyTorch modules on padded sequences.
    model, exp = build_model(dropout, fast_path=path == "mamikit")
    fingerprint = _fingerprint(model)
    model.to(device).train()
    tasks = model.cfg.tasks
    source_cls = MemeFiles if path == "reference" else Store
    root = work / ("memes" if path == "reference" else "store")
    sources = {}
    for ds, meta in plan["datasets"].items():
        sources[ds] = source_cls(root, ds, meta["ids"], np.load(work / f"targets-{ds}.npy"), tuple(meta["labels"]))
    # train.py's loss weights (counted on these memes, as on a training split) and its optimiser; the
    # straightforward path steps with the madgrad package, whose per-parameter loop computes the same update.
    targets = {ds: (np.load(work / f"targets-{ds}.npy"), tuple(meta["labels"])) for ds, meta in plan["datasets"].items()}
    pos_weight = label_pos_weights(tasks, targets)
    groups = param_groups(model, WEIGHT_DECAY, exp.decay_by_name)
    optimizer = MADGRAD(groups, lr=LR) if path == "mamikit" else madgrad.MADGRAD(groups, lr=LR)
    scaler = torch.amp.GradScaler("cuda") if amp and device.type == "cuda" else None

    def forward_backward(ds, index):
        batch = sources[ds].batch(np.asarray(index)).to(device)
        terms = train_step(model, batch, exp, tasks, amp=amp, scaler=scaler, pos_weight=pos_weight)
        return batch, float(terms["loss"])

    cuda = device.type == "cuda"
    setup_s = time.perf_counter() - t_setup
    rss_start = _rss_now()
    peak, peak_cuda = _peak_rss(), 0
    steps = []
    for k, (ds, index, timed) in enumerate(plan["batches"]):
        # The batch's high-water mark above what was resident before it (activations, new gradients).
        peak = max(peak, _peak_rss())
        if cuda:
            peak_cuda = max(peak_cuda, torch.cuda.max_memory_allocated())
            before, resettable = torch.cuda.memory_allocated(), True
            torch.cuda.reset_peak_memory_stats()
        else:
            before, resettable = _rss_now(), _reset_peak_rss()
        _sync(device)
        t0 = time.perf_counter()
        batch, loss = forward_backward(ds, index)
        _sync(device)
        t1 = time.perf_counter()
        batch_peak = None
        if resettable:
            batch_peak = (torch.cuda.max_memory_allocated() if cuda else _peak_rss()) - before
        optimizer_step(model, optimizer, CLIP_NORM, scaler)
        _sync(device)
        t2 = time.perf_counter()
        steps.append({"dataset": ds, "size": len(index), "timed": timed, "loss": loss, "seconds": t2 - t0,
                      "batch_s": t1 - t0, "optimizer_s": t2 - t1, "batch_peak_bytes": batch_peak,
                      "detr_tokens": int(batch.detr.shape[1]), "text_tokens": int(batch.text_ids.shape[1])})
    peak = max(peak, _peak_rss())
    result = {"path": path, "fingerprint": fingerprint, "steps": steps, "setup_s": setup_s, "rss_start": rss_start,
              "peak_rss": peak, "peak_rss_delta": peak - rss_start}
    if cuda:
        result["peak_cuda_bytes"] = max(peak_cuda, torch.cuda.max_memory_allocated())

    first = next(i for i, (_, _, timed) in enumerate(plan["batches"]) if timed)
    ds, index, _ = plan["batches"][first]
    if count_flops:
        counter = _flop_counter()
        with counter:
            forward_backward(ds, index)
        optimizer.zero_grad(set_to_none=True)
        result["flops_step"] = counter.get_total_flops()
        result["flops_step_index"] = first
    if profile:
        from torch.profiler import ProfilerActivity, profile as torch_profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with torch_profile(activities=activities) as prof:
            forward_backward(ds, index)
            optimizer_step(model, optimizer, CLIP_NORM, scaler)
        result["profile"] = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18, max_name_column_width=48)
    return result


# ----------------------------------------------------------------------------- driver


def _flop_counter():
    """FlopCounterMode that also counts the CPU kernel of fused attention (not among PyTorch's formulas)."""
    from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

    aten, custom = torch.ops.aten, {}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        custom[aten._scaled_dot_product_flash_attention_for_cpu] = (
            lambda q, k, v, *args, out_shape=None, **kwargs: sdpa_flop_count(q, k, v))
        custom[aten._scaled_dot_product_flash_attention_for_cpu_backward] = (
            lambda grad, q, k, v, *args, out_shape=None, **kwargs: sdpa_backward_flop_count(grad, q, k, v))
    return FlopCounterMode(display=False, custom_mapping=custom)


def _matmul_gflops(device, n: int = 2048, repeats: int = 5) -> float:
    """Best dense float32 matmul rate of this device."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    best = math.inf
    for _ in range(repeats + 1):
        _sync(device)
        t0 = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def _plan(work: Path, memes: dict, batch_size: int, warmup: int, steps: int, warmup_size: int, seed: int) -> None:
    """Write the batches both paths train on: the first full batches of an epoch of algorithm 1."""
    order = epoch_batches({ds: len(m["ids"]) for ds, m in memes.items()}, batch_size, np.random.default_rng(seed))
    full = [(ds, idx) for ds, idx in order if len(idx) == batch_size]
    if len(full) < warmup + steps:  # the meme counts are chosen so that this cannot happen
        raise SystemExit(f"only {len(full)} full batches for {warmup} warm-up + {steps} timed steps")
    batches = [(ds, idx[:warmup_size].tolist(), False) for ds, idx in full[:warmup]]
    batches += [(ds, idx.tolist(), True) for ds, idx in full[warmup:warmup + steps]]
    datasets = {ds: {"ids": m["ids"], "labels": list(m["labels"])} for ds, m in memes.items()}
    for ds, m in memes.items():
        np.save(work / f"targets-{ds}.npy", m["targets"])
    (work / "plan.json").write_text(json.dumps({"datasets": datasets, "batches": batches}))


def _spawn(work: Path, path: str, args) -> dict:
    """Run one path in a fresh Python process (its own memory high-water mark) -> its result."""
    cmd = [sys.executable, __file__, "--worker", path, "--work", str(work), "--device", args.device,
           "--dropout", str(args.dropout)]
    cmd += ["--amp"] * args.amp + ["--profile"] * args.profile + ["--threads", str(args.threads)] * bool(args.threads)
    if path == "mamikit" or args.reference_flops:
        cmd.append("--count-flops")
    subprocess.run(cmd, check=True)
    return json.loads((work / f"result-{path}.json").read_text())


def _summary(r: dict, batch_size: int, accumulation: int) -> dict:
    """Medians over the timed steps; samples/s with one optimiser step per `accumulation` batches."""
    timed = [s for s in r["steps"] if s["timed"]]
    batch_s = statistics.median(s["batch_s"] for s in timed)
    optimizer_s = statistics.median(s["optimizer_s"] for s in timed)
    flops = r.get("flops_step")
    return {
        "samples_per_s": batch_size / (batch_s + optimizer_s / accumulation),
        "samples_per_s_acc1": batch_size / (batch_s + optimizer_s),
        "step_s": statistics.median(s["seconds"] for s in timed),
        "batch_s": batch_s,
        "optimizer_s": optimizer_s,
        "detr_tokens": statistics.mean(s["detr_tokens"] for s in timed),
        "text_tokens": statistics.mean(s["text_tokens"] for s in timed),
        "gflop_step": flops / 1e9 if flops else None,
        # The counted FLOPs (matmuls and attention of forward + backward) over that batch's measured time.
        "achieved_gflops": flops / 1e9 / r["steps"][r["flops_step_index"]]["batch_s"] if flops else None,
        "peak_mb": (r.get("peak_cuda_bytes") or r["peak_rss"]) / 2**20,
        "peak_delta_mb": r["peak_rss_delta"] / 2**20,
        "batch_peak_mb": (statistics.median(s["batch_peak_bytes"] for s in timed) / 2**20
                          if all(s["batch_peak_bytes"] is not None for s in timed) else None),
    }


ROWS = [
    ("samples/s (accumulation {A})", "samples_per_s", "{:.2f}"),
    ("samples/s (accumulation 1)", "samples_per_s_acc1", "{:.2f}"),
    ("step: batch + optimiser (s)", "step_s", "{:.2f}"),
    ("batch: read + fwd + bwd (s)", "batch_s", "{:.2f}"),
    ("optimiser step (s)", "optimizer_s", "{:.2f}"),
    ("DETR tokens / meme", "detr_tokens", "{:.1f}"),
    ("text tokens / meme", "text_tokens", "{:.1f}"),
    ("GFLOP / batch (fwd + bwd)", "gflop_step", "{:.1f}"),
    ("achieved GFLOP/s", "achieved_gflops", "{:.1f}"),
    ("peak memory (MiB)", "peak_mb", "{:.0f}"),
    ("peak - RSS before steps (MiB)", "peak_delta_mb", "{:.0f}"),
    ("batch high-water over RSS (MiB)", "batch_peak_mb", "{:.0f}"),
]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1 small warm-up + 3 timed steps per path (about a minute on 2 cores)")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--steps", type=int, default=8, help="timed steps per path")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps per path before timing")
    ap.add_argument("--warmup-size", type=int, default=None, help="memes in each warm-up batch (default: the batch size)")
    ap.add_argument("--accumulation", type=int, default=ACCUMULATION,
                    help="batches per optimiser step in the headline samples/s (paper: 20)")
    ap.add_argument("--dropout", type=float, default=0.0, help="model dropout (0 lets the losses be compared)")
    ap.add_argument("--amp", action="store_true", help="float16 autocast on CUDA, as TrainConfig.amp")
    ap.add_argument("--dtype", default="float16", choices=("float16", "float32"),
                    help="stored features, both paths (extract's default: float16)")
    ap.add_argument("--profile", action="store_true", help="print each path's top ops by self CPU time")
    ap.add_argument("--reference-flops", action="store_true", help="also count the reference path's FLOPs (one more slow batch)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch.set_num_threads in both paths (default: PyTorch's); 1 on a CPU other processes share")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--worker", choices=("reference", "mamikit"), help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    ap.add_argument("--count-flops", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        result = run_path(Path(args.work), args.worker, args.device, args.amp, args.dropout, args.profile, args.count_flops)
        (Path(args.work) / f"result-{args.worker}.json").write_text(json.dumps(result))
        return 0
    if args.quick:
        args.steps, args.warmup, args.warmup_size = 3, 1, args.warmup_size or 4
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    if min(args.steps, args.batch_size, args.accumulation) < 1 or args.warmup < 0:
        raise SystemExit("--steps, --batch-size and --accumulation must be positive, --warmup not negative")
    device = torch.device(args.device)
    load = os.getloadavg()[0]
    if args.device == "cpu" and load > 0.75:
        print(f"warning: load average {load:.1f} before starting; other processes share the {os.cpu_count()} "
              "cores and the timings will be noisy", file=sys.stderr)

    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mamikit-bench-") as tmp:
        work = Path(tmp)
        # MAMI alone holds enough full batches for the plan, wherever algorithm 1 draws them from.
        n = (args.warmup + args.steps) * args.batch_size
        sizes = {"MAMI": n, "FBHM": max(args.batch_size, n // 2)}
        memes = make_memes(build_text_model(), sizes, args.seed, np.dtype(args.dtype))
        store_bytes = write_store(work / "store", memes)
        file_bytes = write_meme_files(work / "memes", memes)
        _plan(work, memes, args.batch_size, args.warmup, args.steps, args.warmup_size or args.batch_size, args.seed)
        peak = _matmul_gflops(device)
        wall = {"set-up": time.perf_counter() - t_start}
        results = {}
        for path in ("reference", "mamikit"):
            t0 = time.perf_counter()
            results[path] = _spawn(work, path, args)
            wall[path] = time.perf_counter() - t0
        peak = max(peak, _matmul_gflops(device))

    ref, fast = results["reference"], results["mamikit"]
    if ref["fingerprint"] != fast["fingerprint"]:
        raise SystemExit("the two paths did not start from the same weights")
    losses = [(a["loss"], b["loss"]) for a, b in zip(ref["steps"], fast["steps"])]
    diff = max(abs(a - b) for a, b in losses)
    s_ref, s_fast = (_summary(r, args.batch_size, args.accumulation) for r in (ref, fast))
    speedup = s_fast["samples_per_s"] / s_ref["samples_per_s"]
    speedup_acc1 = s_fast["samples_per_s_acc1"] / s_ref["samples_per_s_acc1"]
    n_memes = sum(sizes.values())

    threads = f" ({torch.get_num_threads()} threads)" if args.device == "cpu" else ""
    print(f"\nexperiment 30 at paper sizes, batch {args.batch_size}, {args.steps} timed steps after {args.warmup} "
          f"warm-up, one optimiser step per batch, dropout {args.dropout}, device {args.device}{threads}")
    print(f"{'':34s}{'reference':>12s}{'mamikit':>12s}")
    for label, key, fmt in ROWS:
        cells = [fmt.format(s[key]) if s[key] is not None else "-" for s in (s_ref, s_fast)]
        print(f"{label.format(A=args.accumulation):34s}{cells[0]:>12s}{cells[1]:>12s}")
    print(f"{'speedup (accumulation %d)' % args.accumulation:34s}{'':>12s}{speedup:>12.2f}")
    print(f"{'speedup (accumulation 1)':34s}{'':>12s}{speedup_acc1:>12.2f}")
    print("losses per step, reference / mamikit: " + ", ".join(f"{a:.6f}/{b:.6f}" for a, b in losses))
    if args.dtype == "float16":
        print("  (mamikit reads float16 text states from the store where the reference runs the text model in float32;"
              " MADGRAD's cube-root steps let that rounding grow a little with every step: --dtype float32 removes it)")
    print(f"feature store: {store_bytes / n_memes:,.0f} bytes per meme ({args.dtype}); "
          f"one file per meme (no text states): {file_bytes / n_memes:,.0f}")
    print(f"dense matmul: {peak:.1f} GFLOP/s; mamikit reaches {s_fast['achieved_gflops'] / peak:.0%} of it")
    print(f"wall time: synthetic memes and files {wall['set-up']:.0f} s, reference subprocess {wall['reference']:.0f} s "
          f"(model {ref['setup_s']:.0f} s), mamikit subprocess {wall['mamikit']:.0f} s (model {fast['setup_s']:.0f} s); "
          f"load average at the start {load:.1f}")
    if args.profile:
        for path in ("reference", "mamikit"):
            print(f"\n--- {path}: top ops by self CPU time, one step\n{results[path]['profile']}")
    summary = {
        "reference_samples_per_s": round(s_ref["samples_per_s"], 3),
        "optimized_samples_per_s": round(s_fast["samples_per_s"], 3),
        "speedup": round(speedup, 3),
        "accumulation": args.accumulation,
        "speedup_accumulation_1": round(speedup_acc1, 3),
        "loss_max_abs_diff": diff,
        "achieved_gflops": round(s_fast["achieved_gflops"], 2),
        "matmul_peak_gflops": round(peak, 2),
        "optimized_gflop_per_batch": round(s_fast["gflop_step"], 2),
        "reference_gflop_per_batch": round(s_ref["gflop_step"], 2) if s_ref["gflop_step"] else None,
        "reference_batch_s": round(s_ref["batch_s"], 3),
        "optimized_batch_s": round(s_fast["batch_s"], 3),
        "reference_optimizer_s": round(s_ref["optimizer_s"], 3),
        "optimized_optimizer_s": round(s_fast["optimizer_s"], 3),
        "reference_peak_mb": round(s_ref["peak_mb"], 1),
        "optimized_peak_mb": round(s_fast["peak_mb"], 1),
        "reference_peak_delta_mb": round(s_ref["peak_delta_mb"], 1),
        "optimized_peak_delta_mb": round(s_fast["peak_delta_mb"], 1),
        "reference_batch_peak_mb": s_ref["batch_peak_mb"] and round(s_ref["batch_peak_mb"], 1),
        "optimized_batch_peak_mb": s_fast["batch_peak_mb"] and round(s_fast["batch_peak_mb"], 1),
        "memory_measure": "torch.cuda.max_memory_allocated" if args.device == "cuda" else "VmHWM per subprocess",
        "store_bytes_per_meme": round(store_bytes / n_memes),
        "store_dtype": args.dtype,
        "meme_file_bytes_per_meme": round(file_bytes / n_memes),
        "batch_size": args.batch_size,
        "timed_steps": args.steps,
        "dropout": args.dropout,
        "device": args.device,
        "threads": torch.get_num_threads() if args.device == "cpu" else None,
        "load_average_at_start": round(load, 2),
        "seconds": round(time.perf_counter() - t_start, 1),
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
