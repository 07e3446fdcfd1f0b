"""One paper epoch of experiment 30, evaluations included: mamikit against the authors' protocol (section 4).

A researcher waits for whole runs, and section 4's run evaluates 7 times per
epoch. This benchmark projects one epoch of experiment 30 (multi encoders,
class-query decoder, projection alignment, MAMI + FBHM) at the `paper` sizes
with random weights (``bench/train_throughput.py``'s model and synthetic memes)
onto the real data sizes: MAMI's 10,000 training memes split 80/20 (8,000
train, 2,000 dev) and its 1,000 test memes; FBHM's 8,500 split 80/20 (6,800
train, 1,700 dev) and dev_seen (500) as its test set. That is 925 batches of
16, 47 optimiser steps (accumulation 20) and 7 evaluations of dev and test
(5,200 memes each). Every figure is measured, not guessed: seconds per
training batch per dataset, per optimiser step and per evaluated meme per
dataset (plus the scoring of full-size splits) over real batches, multiplied
by those counts.

- authors' protocol (leg "reference"), as a straightforward implementation:
  one file read per meme, batches padded to 100 DETR queries and 120 text
  tokens, the frozen text encoder run on every batch, encoders and decoder as
  stock PyTorch modules (``ModelConfig(fast_path=False)``), the decoder run
  once per task on that task's class queries, the ``madgrad`` package's step;
  evaluations of dev and test in batches of 16 under ``torch.no_grad``;
  train-split scores from the running training predictions (no extra pass).
- authors' protocol with the text cached (leg "cached_text"): the same, except
  that each meme's file also holds its frozen text encoder's states, which the
  padded batch carries (``make_batch(pack=False, text_hidden=True)``) and the
  model reads instead of running the text encoder, as mamikit does. It is the
  baseline that tells what mamikit gains beyond caching.
- mamikit: what ``train.py`` does. The feature store, packed batches with the
  cached text states, the fast path with all tasks in one decoder pass,
  ``train_step`` collecting the running predictions, ``mamikit.optim.MADGRAD``
  (its compiled one-pass update at these sizes),
  and dev and test through ``evaluation.predict_split`` (inference mode, length-sorted
  batches of ``TrainConfig.eval_batch_size`` shared out to one single-threaded
  worker per core), train scores from the running predictions
  (``TrainConfig.train_scores="running"``).

All legs start from the same weights; their forward passes are checked to give
the same logits as mamikit's on the same memes. Timed work takes turns between
the legs (the order reversed every other round), so that a change in the
machine's speed hits all of them alike, and each speedup is the median over
rounds of the epoch projected from one leg's round against the same projection
from mamikit's. Checkpoint writes are left out (all legs write the same weights).

    python bench/epoch_time.py --quick     # a few minutes on 2 cores
    python bench/epoch_time.py --batches 6 --eval-memes 512
    python bench/epoch_time.py --quick --threads 1   # on a CPU that other processes share

On a CPU shared with other busy processes, every multi-threaded PyTorch
operation waits for its slowest thread, which the scheduler may have
parked: small operations then cost milliseconds each, the many small ones
of the packed path more than the few large ones of the padded path.
``--threads 1`` takes that out for every leg.

The last line printed is one JSON object with the figures: ``epoch_speedup``
(mamikit over the authors' protocol, text encoder run every batch) and
``epoch_speedup_cached_text`` (mamikit over the authors' protocol with the
text states cached too).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_throughput as tt  # the paper-size model and synthetic memes

# Real data sizes (section 4 and the datasets' own files): memes per split.
EPOCH = {"MAMI": {"train": 8000, "dev": 2000, "test": 1000}, "FBHM": {"train": 6800, "dev": 1700, "test": 500}}
BATCH, ACCUMULATION, EVALS_PER_EPOCH = 16, 20, 7  # section 4
REFERENCE_EVAL_BATCH = 16  # the authors evaluated at the training batch size


# ----------------------------------------------------------------------------- the authors' forward pass


def per_task_forward(model, batch):
    """The authors' forward: encoders once, then the decoder once per task over that task's class queries."""
    from mamikit.model import ModelOutput

    tokens, projections = model._embed_images(batch)
    memory, memory_mask, segments = model._encode_multi(batch, tokens)
    out = ModelOutput(logits={}, mlp_inputs={}, projections=projections, memory_mask=memory_mask,
                      memory_segments=segments)
    for task in (t for t in model.cfg.tasks if t.dataset == batch.dataset):
        idx = torch.tensor([model._label_index[label] for label in task.labels], device=memory.device)
        x = model.queries.index_select(0, idx).unsqueeze(0).expand(memory.shape[0], -1, -1)  # (B, C_task, D)
        for layer in model.decoder:
            x, _, _ = layer(x, memory, ~memory_mask)
        logits, inputs = model.heads[task.name](x)  # (B, C_task, 1)
        out.logits[task.name] = logits.squeeze(-1)
        out.mlp_inputs[task.name] = inputs
    return out


# ----------------------------------------------------------------------------- the three legs


class Protocol:
    """One leg: its model, batch sources, optimiser; one training batch, one optimiser step, one evaluation.

    `name` is one of ``tt.LEGS``: "reference" and "cached_text" follow the
    authors' protocol (the second with the text encoder's states cached in
    each meme's file and carried by its batches), "mamikit" is train.py's.
    """

    def __init__(self, name: str, work: Path, memes: dict, eval_memes: dict, dropout: float):
        import madgrad

        from mamikit.losses import label_pos_weights
        from mamikit.model import param_groups
        from mamikit.optim import MADGRAD
        from mamikit.evaluation import RunningPredictions
        from mamikit.train import TrainConfig

        self.name, self.reference = name, name != "mamikit"  # `reference`: the authors' protocol, cached or not
        self.model, self.exp = tt.build_model(dropout, fast_path=not self.reference)
        self.tasks = self.model.cfg.tasks
        self.fingerprint = tt._fingerprint(self.model)
        self.train_src = {ds: tt.batch_source(work, name, ds, m["ids"], m["targets"], m["labels"], "train")
                          for ds, m in memes.items()}
        self.eval_src = {ds: tt.batch_source(work, name, ds, m["ids"], m["targets"], m["labels"], "dev", "eval-")
                         for ds, m in eval_memes.items()}
        self.pos_weight = label_pos_weights(self.tasks, {ds: (m["targets"], m["labels"]) for ds, m in memes.items()})
        groups = param_groups(self.model, tt.WEIGHT_DECAY, self.exp.decay_by_name)
        self.optimizer = madgrad.MADGRAD(groups, lr=tt.LR) if self.reference else MADGRAD(groups, lr=tt.LR)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.running = RunningPredictions()
        self.eval_batch = REFERENCE_EVAL_BATCH if self.reference else TrainConfig().eval_batch_size

    def train_batch(self, ds: str, index: np.ndarray) -> float:
        """Read, forward, loss, backward of one batch (and the running predictions) -> the loss."""
        from mamikit.losses import dataset_loss
        from mamikit.evaluation import batch_for
        from mamikit.train import train_step

        self.model.train()
        if self.reference:
            batch = self.train_src[ds].batch(index)
            output = per_task_forward(self.model, batch)
            loss, terms = dataset_loss(output, batch, self.tasks, self.exp.proj_align, self.exp.contrastive,
                                       pos_weight=self.pos_weight, align_all_pairs=self.exp.align_all_pairs)
            (loss / ACCUMULATION).backward()
            return float(terms["loss"])
        batch = batch_for(self.model, self.exp, self.train_src[ds].data, index, True)
        terms, probs = train_step(self.model, batch, self.exp, self.tasks, ACCUMULATION, pos_weight=self.pos_weight,
                                  return_probs=True)
        self.running.add(ds, index, probs)
        return float(terms["loss"])

    def optimizer_step(self) -> None:
        """Clip and step as train.py does (the gradients stay: the next step has some to use).

        mamikit folds the clipping factor into its MADGRAD step (`train.optimizer_step`); the
        authors' protocol clips the gradients in place, then steps with the madgrad package.
        """
        from mamikit.optim import clip_coefficient

        if self.reference:
            torch.nn.utils.clip_grad_norm_(self.params, tt.CLIP_NORM)
            self.optimizer.step()
        else:
            self.optimizer.step(grad_scale=clip_coefficient(self.params, tt.CLIP_NORM))

    @torch.no_grad()
    def evaluate(self, ds: str, start: int, n: int) -> dict[str, np.ndarray]:
        """Probabilities of evaluation memes `start` to `start + n` of `ds`, as this protocol evaluates a split."""
        from mamikit.batching import SplitData
        from mamikit.evaluation import predict_split

        self.model.eval()
        if not self.reference:
            data, part = self.eval_src[ds].data, slice(start, start + n)
            sample = SplitData(data.dataset, data.split, data.ids[part], data.rows[part], data.targets[part],
                               data.labels, data.features)
            return predict_split(self.model, self.exp, sample, self.eval_batch)["probs"]
        out: dict[str, list] = {}
        for a in range(start, start + n, self.eval_batch):
            batch = self.eval_src[ds].batch(np.arange(a, min(a + self.eval_batch, start + n)))
            for task, logits in per_task_forward(self.model, batch).logits.items():
                out.setdefault(task, []).append(torch.sigmoid(logits))
        return {task: torch.cat(v).numpy() for task, v in out.items()}


def scoring_seconds(tasks, sizes: dict[str, int], work: Path, seed: int) -> float:
    """Scoring and writing the predictions of one evaluation of dev and test at full size (both protocols alike)."""
    from mamikit.evaluation import split_metrics, write_predictions

    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    for ds, n in sizes.items():
        for task in (t for t in tasks if t.dataset == ds):
            probs = rng.random((n, len(task.labels))).astype(np.float32)
            targets = (rng.random((n, len(task.labels))) < 0.4).astype(np.float32)
            split_metrics(task, probs, targets)
            write_predictions(work / f"{ds}-{task.name}.csv", [f"m{i}" for i in range(n)], task, probs, targets)
    return time.perf_counter() - t0


def _timed(fn, *args):
    t0 = time.perf_counter()
    value = fn(*args)
    return time.perf_counter() - t0, value


# ----------------------------------------------------------------------------- driver


def project(batch_s: dict[str, float], step_s: float, meme_s: dict[str, float], score_s: float) -> dict:
    """One epoch's seconds from one leg's seconds per training batch, optimiser step and evaluated meme."""
    n_batches = {ds: math.ceil(s["train"] / BATCH) for ds, s in EPOCH.items()}
    n_steps = math.ceil(sum(n_batches.values()) / ACCUMULATION)
    eval_sizes = {ds: s["dev"] + s["test"] for ds, s in EPOCH.items()}
    train_s = sum(n_batches[ds] * batch_s[ds] for ds in EPOCH)
    eval_s = EVALS_PER_EPOCH * (sum(eval_sizes[ds] * meme_s[ds] for ds in EPOCH) + score_s)
    total = train_s + n_steps * step_s + eval_s
    return {"train_s": train_s, "optimizer_s": n_steps * step_s, "eval_s": eval_s, "epoch_s": total,
            "eval_share": eval_s / total}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true",
                    help="2 timed rounds, 256 memes evaluated per round (a few minutes)")
    ap.add_argument("--batches", type=int, default=5,
                    help="timed rounds: per leg one training batch per dataset, one optimiser step, "
                         "one evaluation chunk")
    ap.add_argument("--eval-memes", type=int, default=256,
                    help="memes per dataset and round evaluated by mamikit (the authors' protocol: one batch of 16)")
    ap.add_argument("--dropout", type=float, default=0.1, help="model dropout while training (the paper's 0.1)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch.set_num_threads (default: PyTorch's); 1 on a CPU other processes share")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.batches, args.eval_memes = 2, 256
    if min(args.batches, args.eval_memes) < 1:
        raise SystemExit("--batches and --eval-memes must be positive")
    load = os.getloadavg()[0]
    if load > 0.75:
        print(f"warning: load average {load:.1f} before starting; other processes share the {os.cpu_count()} cores: "
              "the seconds are noisy, the ratios less so (the legs take turns)", file=sys.stderr)
    t_start = time.perf_counter()
    ref_eval_n = args.batches * REFERENCE_EVAL_BATCH
    legs = tt.LEGS
    with tempfile.TemporaryDirectory(prefix="mamikit-epoch-") as tmp:
        work = Path(tmp)
        text = tt.build_text_model()
        n_train = (args.batches + 1) * BATCH  # one warm-up batch per dataset
        memes = tt.make_memes(text, {ds: n_train for ds in EPOCH}, args.seed)
        n_eval = max(args.batches * args.eval_memes, ref_eval_n)
        eval_memes = tt.make_memes(text, {ds: n_eval for ds in EPOCH}, args.seed + 1)
        del text
        tt.write_store(work / "store", memes, "train")
        tt.write_store(work / "store", eval_memes, "dev")
        ref_eval_memes = {ds: {k: (v[:ref_eval_n] if k != "labels" else v) for k, v in m.items()}
                          for ds, m in eval_memes.items()}  # the authors' protocol evaluates fewer per round
        for leg, folder in tt.MEME_DIRS.items():
            tt.write_meme_files(work / folder, memes, text_hidden=leg == "cached_text")
            tt.write_meme_files(work / f"eval-{folder}", ref_eval_memes, text_hidden=leg == "cached_text")
        setup_s = time.perf_counter() - t_start
        protocols = {name: Protocol(name, work, memes, eval_memes, args.dropout) for name in legs}
        fast = protocols["mamikit"]
        if len({p.fingerprint for p in protocols.values()}) != 1:
            raise SystemExit("the legs did not start from the same weights")

        # The same function: every leg's forward pass in eval mode on the same memes, against mamikit's.
        diff = {name: 0.0 for name in legs[:2]}
        for ds in EPOCH:
            b = fast.evaluate(ds, 0, REFERENCE_EVAL_BATCH)
            for name in diff:
                a = protocols[name].evaluate(ds, 0, REFERENCE_EVAL_BATCH)
                diff[name] = max(diff[name], *(float(np.abs(a[t] - b[t]).max()) for t in a))

        # Rounds of every kind of work, so that training, steps and evaluations see the same load, the legs
        # taking turns (the order reversed every other round); round 0 warms up (and creates the optimisers'
        # state) untimed.
        batch_s = {name: {ds: [] for ds in EPOCH} for name in legs}
        step_s = {name: [] for name in legs}
        eval_s = {name: {ds: [] for ds in EPOCH} for name in legs}  # seconds per round
        eval_n = {name: REFERENCE_EVAL_BATCH if p.reference else args.eval_memes for name, p in protocols.items()}
        orders = {ds: np.random.default_rng([args.seed, i]).permutation(n_train) for i, ds in enumerate(EPOCH)}
        for k in range(args.batches + 1):
            turns = [(name, protocols[name]) for name in (legs if k % 2 == 0 else legs[::-1])]
            for ds in EPOCH:
                index = orders[ds][k * BATCH:(k + 1) * BATCH]
                for name, p in turns:
                    seconds, _ = _timed(p.train_batch, ds, index)
                    if k:
                        batch_s[name][ds].append(seconds)
            for name, p in turns:
                seconds, _ = _timed(p.optimizer_step)
                if k:
                    step_s[name].append(seconds)
            for ds in EPOCH:
                for name, p in turns:
                    seconds, _ = _timed(p.evaluate, ds, max(k - 1, 0) * eval_n[name], eval_n[name])
                    if k:
                        eval_s[name][ds].append(seconds)
        eval_sizes = {ds: s["dev"] + s["test"] for ds, s in EPOCH.items()}
        score_s = min(scoring_seconds(fast.tasks, eval_sizes, work, args.seed) for _ in range(2))

    n_batches = {ds: math.ceil(s["train"] / BATCH) for ds, s in EPOCH.items()}
    n_steps = math.ceil(sum(n_batches.values()) / ACCUMULATION)
    figures, rounds = {}, {}
    for name in legs:
        meme_s = {ds: sum(eval_s[name][ds]) / (eval_n[name] * args.batches) for ds in EPOCH}
        median_batch_s = {ds: statistics.median(batch_s[name][ds]) for ds in EPOCH}
        optimizer_step_s = statistics.median(step_s[name])
        figures[name] = {**project(median_batch_s, optimizer_step_s, meme_s, score_s),
                         "optimizer_step_s": optimizer_step_s,
                         **{f"batch_s_{ds}": median_batch_s[ds] for ds in EPOCH},
                         **{f"eval_ms_per_meme_{ds}": 1e3 * meme_s[ds] for ds in EPOCH}}
        # The same projection from each round's own measurements: the pairs that the speedups divide.
        rounds[name] = [project({ds: batch_s[name][ds][i] for ds in EPOCH}, step_s[name][i],
                                {ds: eval_s[name][ds][i] / eval_n[name] for ds in EPOCH}, score_s)
                        for i in range(args.batches)]
    speedup = {(slow, key): tt.paired_speedup([x[key] for x in rounds[slow]], [x[key] for x in rounds["mamikit"]])
               for slow in legs[:2] for key in ("epoch_s", "train_s", "eval_s")}
    r, c, m = (figures[name] for name in legs)

    threads = torch.get_num_threads()
    print(f"\none epoch of experiment 30 at paper sizes, projected to the real data: "
          f"{sum(n_batches.values())} batches of {BATCH} (MAMI {EPOCH['MAMI']['train']}, "
          f"FBHM {EPOCH['FBHM']['train']}), "
          f"{n_steps} optimiser steps, "
          f"{EVALS_PER_EPOCH} evaluations of dev + test ({sum(eval_sizes.values())} memes); CPU, {threads} threads")
    rows = [("training: read + fwd + bwd (s)", "train_s", "{:.0f}"), ("optimiser steps (s)", "optimizer_s", "{:.0f}"),
            ("evaluations (s)", "eval_s", "{:.0f}"), ("epoch (s)", "epoch_s", "{:.0f}"),
            ("evaluation share of the epoch", "eval_share", "{:.2f}"),
            ("per MAMI training batch (s)", "batch_s_MAMI", "{:.2f}"),
            ("per FBHM training batch (s)", "batch_s_FBHM", "{:.2f}"),
            ("per optimiser step (s)", "optimizer_step_s", "{:.2f}"),
            ("per evaluated MAMI meme (ms)", "eval_ms_per_meme_MAMI", "{:.1f}"),
            ("per evaluated FBHM meme (ms)", "eval_ms_per_meme_FBHM", "{:.1f}")]
    print(f"{'':34s}{'authors':>12s}{'text cached':>12s}{'mamikit':>12s}")
    for label, key, fmt in rows:
        print(f"{label:34s}" + "".join(f"{fmt.format(f[key]):>12s}" for f in (r, c, m)))
    print("mamikit speedup (median of per-round ratios) over: the authors' protocol / the same with the text cached")
    for label, key in (("  epoch", "epoch_s"), ("  training", "train_s"), ("  evaluations", "eval_s")):
        print(f"{label:34s}{speedup['reference', key]:>12.2f}{speedup['cached_text', key]:>12.2f}")
    print(f"evaluation batches: authors {REFERENCE_EVAL_BATCH}, mamikit {fast.eval_batch} (length-sorted); "
          f"scoring + predictions files {score_s:.2f} s per evaluation (all legs); logits equal to mamikit's to "
          f"{diff['reference']:.1e} (authors), {diff['cached_text']:.1e} (text cached)")
    print(f"wall time {time.perf_counter() - t_start:.0f} s (synthetic memes {setup_s:.0f} s); "
          f"load average at the start {load:.1f}")
    summary = {
        "epoch_s": round(m["epoch_s"], 1),
        "reference_epoch_s": round(r["epoch_s"], 1),
        "cached_text_epoch_s": round(c["epoch_s"], 1),
        "epoch_speedup": round(speedup["reference", "epoch_s"], 3),
        "epoch_speedup_cached_text": round(speedup["cached_text", "epoch_s"], 3),
        "epoch_speedup_rounds": [round(a["epoch_s"] / b["epoch_s"], 3)
                                 for a, b in zip(rounds["reference"], rounds["mamikit"])],
        "epoch_speedup_cached_text_rounds": [round(a["epoch_s"] / b["epoch_s"], 3)
                                             for a, b in zip(rounds["cached_text"], rounds["mamikit"])],
        "eval_share": round(m["eval_share"], 4),
        "optimizer_step_s": round(m["optimizer_step_s"], 3),
        "reference_optimizer_step_s": round(r["optimizer_step_s"], 3),
        "cached_text_optimizer_step_s": round(c["optimizer_step_s"], 3),
        "train_s": round(m["train_s"], 1), "optimizer_s": round(m["optimizer_s"], 1), "eval_s": round(m["eval_s"], 1),
        "reference_train_s": round(r["train_s"], 1), "reference_optimizer_s": round(r["optimizer_s"], 1),
        "reference_eval_s": round(r["eval_s"], 1), "reference_eval_share": round(r["eval_share"], 4),
        "cached_text_train_s": round(c["train_s"], 1), "cached_text_optimizer_s": round(c["optimizer_s"], 1),
        "cached_text_eval_s": round(c["eval_s"], 1), "cached_text_eval_share": round(c["eval_share"], 4),
        "eval_speedup": round(speedup["reference", "eval_s"], 3),
        "train_speedup": round(speedup["reference", "train_s"], 3),
        "eval_speedup_cached_text": round(speedup["cached_text", "eval_s"], 3),
        "train_speedup_cached_text": round(speedup["cached_text", "train_s"], 3),
        "logits_max_abs_diff": diff["reference"], "cached_text_logits_max_abs_diff": diff["cached_text"],
        "eval_batch_size": fast.eval_batch, "timed_batches": args.batches,
        "eval_memes": args.eval_memes, "threads": threads, "load_average_at_start": round(load, 2),
        "seconds": round(time.perf_counter() - t_start, 1),
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
