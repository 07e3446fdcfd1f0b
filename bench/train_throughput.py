"""Training throughput of experiment 30 at the paper's sizes: three ways to train it, interleaved (section 4).

Section 4 trained on one P100 and pre-computed the frozen backbones' outputs to
make that affordable. This benchmark builds experiment 30 (multi encoders,
class-query decoder, projection alignment, MAMI + FBHM tasks, CLIP + DETR) at
the `paper` sizes with random weights -- hidden 768, 6-layer 8-head image
encoders and decoder, a BERT-base text encoder from a transformers
``BertConfig`` (nothing downloaded), CLIP 640-d, DETR 256-d -- on synthetic
memes shaped like MAMI's (DETR keeps about one query in ten; text lengths
log-normal around 30 tokens, clipped to [5, 120]). It runs the same optimiser
steps three ways (legs):

- reference: the straightforward implementation of the authors' protocol.
  One file read per meme, every batch padded to 100 DETR queries and 120 text
  tokens (``make_batch(pack=False)``), the frozen text encoder run on every
  batch, and the model's encoders and decoder called as stock PyTorch modules
  on those padded sequences (``ModelConfig(fast_path=False)``).
- cached_text: the same straightforward implementation, except that each
  meme's file also holds its frozen text encoder's states, which the batch
  carries (``make_batch(pack=False, text_hidden=True)``) and the model reads
  instead of running the text encoder, as mamikit does. About half the
  reference's FLOPs are the text encoder's: this leg is the baseline that
  tells what mamikit gains beyond caching.
- mamikit: what ``train.py`` does. The memory-mapped feature store, batches
  packed to their kept DETR queries and real text tokens
  (``make_batch(pack=True)``), the text encoder's states read from the store,
  the image encoders run on real tokens only and the decoder's key/value
  projections folded into its class queries (``ModelConfig(fast_path=True)``:
  ``fastpath.packed_encoder``, ``fastpath.folded_cross_attention``).

All legs start from the same weights (built from the same seed; checked), see
the same batches (``epoch_batches`` order, both datasets interleaved), go
through ``train.train_step`` (forward, loss with train.py's per-label
``pos_weight``, backward) and take MADGRAD steps with gradient clipping: the
``madgrad`` package on the straightforward legs, ``mamikit.optim.MADGRAD``
(the same update as multi-tensor operations) on mamikit's, as ``train.py``.
The learning rate is held at the paper's peak 2e-4 (the warm-up schedule only
scales it) and dropout is off by default, so that the legs' losses can be
compared step by step. Each leg runs in its own process, so that its peak
memory is its own, and the legs take turns batch by batch (the order reversed
every other round): a host whose speed drifts from minute to minute slows
all of them alike. The speedups are medians of per-round ratios, each between
two legs' runs of the same batch at nearly the same moment.

Every batch is followed by an optimiser step, and the two are timed apart:
a batch (read, assemble, forward, backward) and a step (clip + MADGRAD). The
optimiser's arithmetic is the same on all legs and does not depend on the batch.
The headline samples/s is for the paper's training, one step per 20 batches
(``--accumulation``): batch / (t_batch + t_step / 20); the figures with a step
after every batch are printed beside it.

    python bench/train_throughput.py --quick          # 1 small warm-up + 3 timed rounds, batch 16
    python bench/train_throughput.py --steps 10 --profile
    python bench/train_throughput.py --device cuda --amp

The last line printed is one JSON object with the figures: ``speedup`` (mamikit
over the authors' protocol, text encoder run every batch) and
``speedup_cached_text`` (mamikit over the straightforward implementation that
caches the text states too), each with its accumulation-1 twin.
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
                                      experiment_tasks(exp), dropout=dropout, fast_path=fast_path,
                                      cls_token_id=CLS, sep_token_id=SEP)
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
    """Synthetic stored features per dataset (floats in `dtype`).

    Each dataset's dict: ids, clip, detr embeds/logits/mask, text ids and states, targets, labels.
    """
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


def write_meme_files(root: Path, memes: dict[str, dict], text_hidden: bool = False) -> int:
    """The straightforward layout: one small safetensors file per meme -> bytes written.

    `text_hidden` adds each meme's text encoder states (the cached-text leg's files).
    """
    from safetensors.numpy import save_file

    total = 0
    for ds, m in memes.items():
        (root / ds).mkdir(parents=True, exist_ok=True)
        for i, meme_id in enumerate(m["ids"]):
            path = root / ds / f"{meme_id}.safetensors"
            arrays = {"clip": m["clip"][i], "detr": m["detr"][i], "detr_mask": m["detr_mask"][i],
                      "input_ids": m["text_ids"][i]}
            if text_hidden:
                arrays["hidden"] = m["text_hidden"][i]
            save_file(arrays, str(path))
            total += path.stat().st_size
    return total


# ----------------------------------------------------------------------------- the batch sources

LEGS = ("reference", "cached_text", "mamikit")
MEME_DIRS = {"reference": "memes", "cached_text": "memes-text"}  # each straightforward leg's own files


class MemeFiles:
    """Straightforward batches: read each meme's own file, then the padded layout of `make_batch(pack=False)`.

    With `text_hidden` the files hold the text encoder's states and the batch
    carries them (the model then reads them instead of running its text encoder).
    """

    def __init__(self, root: Path, ds: str, ids: list[str], targets: np.ndarray, labels: tuple,
                 text_hidden: bool = False):
        self.root, self.ds, self.ids, self.targets, self.labels = root, ds, ids, targets, labels
        self.text_hidden = text_hidden

    def batch(self, index: np.ndarray):
        from safetensors.torch import load_file

        # One read per meme.
        memes = [load_file(str(self.root / self.ds / f"{self.ids[i]}.safetensors")) for i in index]
        lengths = torch.tensor([len(m["input_ids"]) for m in memes])
        feats = SplitFeatures(
            ids=[self.ids[i] for i in index],
            clip=torch.stack([m["clip"] for m in memes]),
            detr=torch.stack([m["detr"] for m in memes]),
            detr_mask=torch.stack([m["detr_mask"].bool() for m in memes]),
            text_ids=torch.cat([m["input_ids"] for m in memes]),
            text_hidden=torch.cat([m["hidden"] for m in memes]) if self.text_hidden else None,  # (T, Dt) ragged
            text_offsets=torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]),
        )
        local = SplitData(self.ds, "train", feats.ids, np.arange(len(index)), self.targets[index], self.labels, feats)
        return make_batch(local, np.arange(len(index)), pack=False, text_hidden=self.text_hidden, detr_all=True,
                          max_text_tokens=MAX_TEXT)


class Store:
    """mamikit's batches: slices of the memory-mapped store, packed, with the cached text states (as train.py)."""

    def __init__(self, root: Path, ds: str, ids: list[str], targets: np.ndarray, labels: tuple, split: str = "train"):
        feats = FeatureStore(root).load(ds, split, ("clip", "detr", "text"))
        self.data = SplitData(ds, split, ids, feats.rows(ids), targets, labels, feats)

    def batch(self, index: np.ndarray):
        return make_batch(self.data, index, pack=True, text_hidden=True, detr_all=True)


def batch_source(work: Path, leg: str, ds: str, ids: list[str], targets: np.ndarray, labels: tuple,
                 split: str = "train", prefix: str = ""):
    """Where `leg` reads its batches: the store (mamikit), or its own files, one per meme (folder `prefix` + name)."""
    if leg == "mamikit":
        return Store(work / "store", ds, ids, targets, labels, split)
    return MemeFiles(work / (prefix + MEME_DIRS[leg]), ds, ids, targets, labels, text_hidden=leg == "cached_text")


# ----------------------------------------------------------------------------- one leg (its own process)


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


class Leg:
    """One leg's model, batch sources and optimiser; trains the planned batches one at a time, as it is told."""

    def __init__(self, work: Path, leg: str, device_name: str, amp: bool, dropout: float):
        import madgrad

        from mamikit.losses import label_pos_weights
        from mamikit.model import param_groups
        from mamikit.optim import MADGRAD

        t_setup = time.perf_counter()
        self.leg, self.device = leg, torch.device(device_name)
        self.plan = json.loads((work / "plan.json").read_text())
        # The straightforward legs run the model's encoders and decoder as stock PyTorch modules on padded sequences.
        self.model, self.exp = build_model(dropout, fast_path=leg == "mamikit")
        self.fingerprint = _fingerprint(self.model)
        self.model.to(self.device).train()
        targets = {ds: (np.load(work / f"targets-{ds}.npy"), tuple(meta["labels"]))
                   for ds, meta in self.plan["datasets"].items()}
        self.sources = {ds: batch_source(work, leg, ds, meta["ids"], *targets[ds])
                        for ds, meta in self.plan["datasets"].items()}
        # train.py's loss weights (counted on these memes, as on a training split) and its optimiser; the
        # straightforward legs step with the madgrad package, whose per-parameter loop computes the same update.
        self.pos_weight = label_pos_weights(self.model.cfg.tasks, targets)
        groups = param_groups(self.model, WEIGHT_DECAY, self.exp.decay_by_name)
        self.optimizer = MADGRAD(groups, lr=LR) if leg == "mamikit" else madgrad.MADGRAD(groups, lr=LR)
        self.amp = amp
        self.scaler = torch.amp.GradScaler("cuda") if amp and self.device.type == "cuda" else None
        self.cuda = self.device.type == "cuda"
        self.setup_s = time.perf_counter() - t_setup
        self.rss_start = _rss_now()
        self.peak, self.peak_cuda = _peak_rss(), 0

    def forward_backward(self, ds: str, index):
        """Read, assemble, forward, loss and backward of one batch -> (batch, loss)."""
        from mamikit.train import train_step

        batch = self.sources[ds].batch(np.asarray(index)).to(self.device)
        terms = train_step(self.model, batch, self.exp, self.model.cfg.tasks, amp=self.amp, scaler=self.scaler,
                           pos_weight=self.pos_weight)
        return batch, float(terms["loss"])

    def step(self, k: int) -> dict:
        """Planned batch `k` and an optimiser step, timed apart, with the batch's memory high-water mark."""
        from mamikit.train import optimizer_step

        ds, index, timed = self.plan["batches"][k]
        # The batch's high-water mark above what was resident before it (activations, new gradients).
        self.peak = max(self.peak, _peak_rss())
        if self.cuda:
            self.peak_cuda = max(self.peak_cuda, torch.cuda.max_memory_allocated())
            before, resettable = torch.cuda.memory_allocated(), True
            torch.cuda.reset_peak_memory_stats()
        else:
            before, resettable = _rss_now(), _reset_peak_rss()
        _sync(self.device)
        t0 = time.perf_counter()
        batch, loss = self.forward_backward(ds, index)
        _sync(self.device)
        t1 = time.perf_counter()
        batch_peak = None
        if resettable:
            batch_peak = (torch.cuda.max_memory_allocated() if self.cuda else _peak_rss()) - before
        optimizer_step(self.model, self.optimizer, CLIP_NORM, self.scaler)
        _sync(self.device)
        t2 = time.perf_counter()
        return {"dataset": ds, "size": len(index), "timed": timed, "loss": loss, "seconds": t2 - t0,
                "batch_s": t1 - t0, "optimizer_s": t2 - t1, "batch_peak_bytes": batch_peak,
                "detr_tokens": int(batch.detr.shape[1]), "text_tokens": int(batch.text_ids.shape[1])}

    def finish(self, profile: bool) -> dict:
        """Memory figures, the FLOPs of the first timed batch (run once more) and optionally its profile."""
        from mamikit.train import optimizer_step

        self.peak = max(self.peak, _peak_rss())
        result = {"leg": self.leg, "setup_s": self.setup_s, "rss_start": self.rss_start, "peak_rss": self.peak,
                  "peak_rss_delta": self.peak - self.rss_start}
        if self.cuda:
            result["peak_cuda_bytes"] = max(self.peak_cuda, torch.cuda.max_memory_allocated())
        first = next(i for i, (_, _, timed) in enumerate(self.plan["batches"]) if timed)
        ds, index, _ = self.plan["batches"][first]
        counter = _flop_counter()
        with counter:
            self.forward_backward(ds, index)
        self.optimizer.zero_grad(set_to_none=True)
        result["flops_step"] = counter.get_total_flops()
        result["flops_step_index"] = first
        if profile:
            from torch.profiler import ProfilerActivity, profile as torch_profile

            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
            with torch_profile(activities=activities) as prof:
                self.forward_backward(ds, index)
                optimizer_step(self.model, self.optimizer, CLIP_NORM, self.scaler)
            result["profile"] = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18,
                                                          max_name_column_width=48)
        return result


def serve_leg(work: Path, leg: str, args) -> None:
    """The leg's process: build the leg, then answer the driver's commands (one JSON line each way)."""
    replies = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # anything else printed goes to stderr: stdout carries only the replies
    runner = Leg(work, leg, args.device, args.amp, args.dropout)
    replies.write(json.dumps({"ready": True, "fingerprint": runner.fingerprint}) + "\n")
    for line in sys.stdin:
        command = json.loads(line)
        if command["do"] == "step":
            replies.write(json.dumps(runner.step(command["k"])) + "\n")
        else:
            replies.write(json.dumps(runner.finish(args.profile)) + "\n")
            return


class LegProcess:
    """The driver's handle on one leg's process."""

    def __init__(self, work: Path, leg: str, args):
        cmd = [sys.executable, __file__, "--worker", leg, "--work", str(work), "--device", args.device,
               "--dropout", str(args.dropout)]
        cmd += ["--amp"] * args.amp + ["--profile"] * args.profile
        cmd += ["--threads", str(args.threads)] * bool(args.threads)
        self.leg = leg
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def reply(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"the {self.leg} leg's process stopped (exit status {self.proc.wait()}); "
                             "its error is printed above")
        return json.loads(line)

    def call(self, **command) -> dict:
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()
        return self.reply()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def run_legs(work: Path, args) -> tuple[dict, float]:
    """All legs, batch by batch in turns (the order reversed every other round) -> ({leg: result}, seconds)."""
    plan = json.loads((work / "plan.json").read_text())
    procs = {leg: LegProcess(work, leg, args) for leg in LEGS}  # they build their models side by side
    try:
        ready = {leg: p.reply() for leg, p in procs.items()}
        t0 = time.perf_counter()
        steps = {leg: [] for leg in LEGS}
        for k in range(len(plan["batches"])):
            for leg in (LEGS if k % 2 == 0 else LEGS[::-1]):
                steps[leg].append(procs[leg].call(do="step", k=k))
        seconds = time.perf_counter() - t0
        # Every leg counts its FLOPs (one more batch): the reference's less the cached leg's are the text encoder's.
        results = {leg: {**p.call(do="finish"), **ready[leg], "steps": steps[leg]}
                   for leg, p in procs.items()}
    finally:
        for p in procs.values():
            p.close()
    return results, seconds


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


def paired_speedup(slow_s: list[float], fast_s: list[float]) -> float:
    """Median over rounds of slow seconds / fast seconds, each pair measured at nearly the same moment.

    A ratio of medians would divide one leg's typical second by another's taken
    minutes apart, on a host whose speed moves in between; each round's ratio does not.
    """
    if len(slow_s) != len(fast_s) or not slow_s:
        raise ValueError(f"paired timings needed: {len(slow_s)} against {len(fast_s)} rounds")
    return statistics.median(a / b for a, b in zip(slow_s, fast_s))


def round_seconds(r: dict, accumulation: int) -> list[float]:
    """Seconds per batch with one optimiser step per `accumulation` batches, for each timed round of a leg."""
    return [s["batch_s"] + s["optimizer_s"] / accumulation for s in r["steps"] if s["timed"]]


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


def _rounded(x, digits: int):
    return None if x is None else round(x, digits)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true",
                    help="1 small warm-up + 3 timed rounds (a few minutes on 2 cores)")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--steps", type=int, default=8, help="timed rounds (one step of every leg each)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed rounds before timing")
    ap.add_argument("--warmup-size", type=int, default=None,
                    help="memes in each warm-up batch (default: the batch size)")
    ap.add_argument("--accumulation", type=int, default=ACCUMULATION,
                    help="batches per optimiser step in the headline samples/s (paper: 20)")
    ap.add_argument("--dropout", type=float, default=0.0, help="model dropout (0 lets the losses be compared)")
    ap.add_argument("--amp", action="store_true", help="float16 autocast on CUDA, as TrainConfig.amp")
    ap.add_argument("--dtype", default="float16", choices=("float16", "float32"),
                    help="stored features and text states, all legs (extract's default: float16)")
    ap.add_argument("--profile", action="store_true", help="print each leg's top ops by self CPU time")
    ap.add_argument("--reference-flops", action="store_true", help=argparse.SUPPRESS)  # counted always now
    ap.add_argument("--threads", type=int, default=None,
                    help="torch.set_num_threads in every leg (default: PyTorch's); 1 on a CPU other processes share")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--worker", choices=LEGS, help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        serve_leg(Path(args.work), args.worker, args)
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
              "cores: the seconds are noisy, the ratios less so (the legs take turns)", file=sys.stderr)

    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mamikit-bench-") as tmp:
        work = Path(tmp)
        # MAMI alone holds enough full batches for the plan, wherever algorithm 1 draws them from.
        n = (args.warmup + args.steps) * args.batch_size
        sizes = {"MAMI": n, "FBHM": max(args.batch_size, n // 2)}
        memes = make_memes(build_text_model(), sizes, args.seed, np.dtype(args.dtype))
        store_bytes = write_store(work / "store", memes)
        file_bytes = {leg: write_meme_files(work / MEME_DIRS[leg], memes, text_hidden=leg == "cached_text")
                      for leg in MEME_DIRS}
        _plan(work, memes, args.batch_size, args.warmup, args.steps, args.warmup_size or args.batch_size, args.seed)
        peak = _matmul_gflops(device)
        setup_s = time.perf_counter() - t_start
        results, legs_s = run_legs(work, args)
        peak = max(peak, _matmul_gflops(device))

    if len({r["fingerprint"] for r in results.values()}) != 1:
        raise SystemExit("the legs did not start from the same weights")
    losses = list(zip(*([s["loss"] for s in results[leg]["steps"]] for leg in LEGS)))  # (reference, cached, mamikit)
    diff = max(abs(a - c) for a, _, c in losses)
    diff_cached = max(abs(b - c) for _, b, c in losses)
    s = {leg: _summary(results[leg], args.batch_size, args.accumulation) for leg in LEGS}
    rounds = {leg: {a: round_seconds(results[leg], a) for a in (args.accumulation, 1)} for leg in LEGS}
    speedups = {(slow, a): paired_speedup(rounds[slow][a], rounds["mamikit"][a])
                for slow in ("reference", "cached_text") for a in (args.accumulation, 1)}
    text_cache = paired_speedup(rounds["reference"][args.accumulation], rounds["cached_text"][args.accumulation])
    n_memes = sum(sizes.values())

    ref, cached, fast = s["reference"], s["cached_text"], s["mamikit"]
    threads = f" ({torch.get_num_threads()} threads)" if args.device == "cpu" else ""
    print(f"\nexperiment 30 at paper sizes, batch {args.batch_size}, {args.steps} timed rounds after {args.warmup} "
          f"warm-up, one optimiser step per batch, dropout {args.dropout}, device {args.device}{threads}")
    print(f"{'':34s}{'reference':>12s}{'cached text':>12s}{'mamikit':>12s}")
    for label, key, fmt in ROWS:
        cells = [fmt.format(s[leg][key]) if s[leg][key] is not None else "-" for leg in LEGS]
        print(f"{label.format(A=args.accumulation):34s}" + "".join(f"{c:>12s}" for c in cells))
    for a in (args.accumulation, 1):
        print(f"{'mamikit speedup (accumulation %d)' % a:34s}"
              f"{speedups['reference', a]:>12.2f}{speedups['cached_text', a]:>12.2f}")
    print(f"  (medians of per-round ratios: mamikit against each leg in its column; caching the text states alone: "
          f"{text_cache:.2f})")
    print("losses per step, reference / cached text / mamikit: "
          + ", ".join("/".join(f"{x:.6f}" for x in step) for step in losses))
    if args.dtype == "float16":
        print("  (the cached legs read float16 text states where the reference runs the text model in float32; "
              "MADGRAD's cube-root steps let that rounding grow a little with every step: --dtype float32 removes it)")
    print(f"feature store: {store_bytes / n_memes:,.0f} bytes per meme ({args.dtype}); one file per meme: "
          f"{file_bytes['reference'] / n_memes:,.0f} (no text states), {file_bytes['cached_text'] / n_memes:,.0f} "
          "(with them)")
    print(f"the text encoder's share of the reference's FLOPs: {1 - cached['gflop_step'] / ref['gflop_step']:.0%}; "
          f"dense matmul: {peak:.1f} GFLOP/s; mamikit reaches {fast['achieved_gflops'] / peak:.0%} of it")
    print(f"wall time: synthetic memes and files {setup_s:.0f} s, the legs in turns {legs_s:.0f} s (models "
          + ", ".join(f"{leg} {results[leg]['setup_s']:.0f} s" for leg in LEGS)
          + f", side by side); load average at the start {load:.1f}")
    if args.profile:
        for leg in LEGS:
            print(f"\n--- {leg}: top ops by self CPU time, one step\n{results[leg]['profile']}")
    summary = {
        "reference_samples_per_s": round(ref["samples_per_s"], 3),
        "cached_text_samples_per_s": round(cached["samples_per_s"], 3),
        "optimized_samples_per_s": round(fast["samples_per_s"], 3),
        "speedup": round(speedups["reference", args.accumulation], 3),
        "speedup_cached_text": round(speedups["cached_text", args.accumulation], 3),
        "accumulation": args.accumulation,
        "speedup_accumulation_1": round(speedups["reference", 1], 3),
        "speedup_cached_text_accumulation_1": round(speedups["cached_text", 1], 3),
        "speedup_text_cache_alone": round(text_cache, 3),
        "speedup_rounds": [round(a / b, 3) for a, b in zip(rounds["reference"][args.accumulation],
                                                             rounds["mamikit"][args.accumulation])],
        "speedup_cached_text_rounds": [round(a / b, 3) for a, b in zip(rounds["cached_text"][args.accumulation],
                                                                       rounds["mamikit"][args.accumulation])],
        "loss_max_abs_diff": diff,
        "cached_text_loss_max_abs_diff": diff_cached,
        "achieved_gflops": round(fast["achieved_gflops"], 2),
        "matmul_peak_gflops": round(peak, 2),
        "optimized_gflop_per_batch": round(fast["gflop_step"], 2),
        "cached_text_gflop_per_batch": round(cached["gflop_step"], 2),
        "reference_gflop_per_batch": round(ref["gflop_step"], 2),
        "text_encoder_flop_share": round(1 - cached["gflop_step"] / ref["gflop_step"], 3),
        "reference_batch_s": round(ref["batch_s"], 3),
        "cached_text_batch_s": round(cached["batch_s"], 3),
        "optimized_batch_s": round(fast["batch_s"], 3),
        "reference_optimizer_s": round(ref["optimizer_s"], 3),
        "cached_text_optimizer_s": round(cached["optimizer_s"], 3),
        "optimized_optimizer_s": round(fast["optimizer_s"], 3),
        "reference_peak_mb": round(ref["peak_mb"], 1),
        "cached_text_peak_mb": round(cached["peak_mb"], 1),
        "optimized_peak_mb": round(fast["peak_mb"], 1),
        "reference_peak_delta_mb": round(ref["peak_delta_mb"], 1),
        "cached_text_peak_delta_mb": round(cached["peak_delta_mb"], 1),
        "optimized_peak_delta_mb": round(fast["peak_delta_mb"], 1),
        "reference_batch_peak_mb": _rounded(ref["batch_peak_mb"], 1),
        "cached_text_batch_peak_mb": _rounded(cached["batch_peak_mb"], 1),
        "optimized_batch_peak_mb": _rounded(fast["batch_peak_mb"], 1),
        "memory_measure": "torch.cuda.max_memory_allocated" if args.device == "cuda" else "VmHWM per leg process",
        "store_bytes_per_meme": round(store_bytes / n_memes),
        "store_dtype": args.dtype,
        "meme_file_bytes_per_meme": round(file_bytes["reference"] / n_memes),
        "cached_text_meme_file_bytes_per_meme": round(file_bytes["cached_text"] / n_memes),
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
