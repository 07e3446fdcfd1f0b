"""What experiment 30's training step and evaluation cost beyond their arithmetic: operators per meme (section 4).

On a GPU a training step of experiment 30 at batch 16 is bound by the CPU that
launches its work, not by the GPU's arithmetic (see
docs/performance.md "On a GPU: mixed precision, resume, the GPU check").
This benchmark measures that overhead on any CPU (its figures:
docs/performance.md "Step overhead: operators per meme"); it builds experiment
30 with the paper's structure -- CLIP and DETR image encoders of 6 layers,
a 6-layer class-query decoder, 8 heads, one class query per label, the MAMI
and FBHM tasks, projection alignment, batches packed as ``train.py`` packs
them -- at tiny widths (model width 32, 16-wide CLIP and DETR vectors, 20
stored DETR queries of which about one in ten is kept, 3 to 10 text tokens),
so that the arithmetic nearly vanishes and what is left is the work of
calling operators. The memes are synthetic and held in memory (a
``SplitFeatures`` of tensors, laid out as the feature store's); the frozen
text model's states are read from them, never computed.

Two paths, each from the same weights:

- fast: what ``train.py`` does. Batches packed to the kept DETR queries and
  real text tokens (``evaluation.batch_for``), ``ModelConfig(fast_path=True)``
  (``fastpath.packed_encoder``, ``fastpath.folded_cross_attention``),
  ``mamikit.optim.MADGRAD`` with the clipping folded in
  (``train.optimizer_step``); evaluation through ``evaluation.predict_split``.
- reference: the straightforward implementation with the text states cached
  (``bench/train_throughput.py``'s cached-text leg). Batches padded to every
  stored DETR query and 12 text tokens (``make_batch(pack=False)``), stock
  PyTorch modules (``ModelConfig(fast_path=False)``), the ``madgrad``
  package's per-parameter step after ``clip_grad_norm_``; evaluation batch by
  batch under ``torch.no_grad``.

A training step is four phases, each timed and counted apart: ``batch``
(assembling the batch from the in-memory features), ``forward`` (the model
and the loss of equations 5-6, as ``train.train_step`` calls them, divided by
its window), ``backward`` and ``optimizer`` (clipping, the MADGRAD step,
zeroing the gradients), with one optimiser step per ``--accumulation``
batches (default 1: after every batch; the paper's is 20, where a round is
one window of 20 batches, the datasets taking turns). The fast path runs a
window's batches of one dataset as one merged batch, as ``train.py`` does
(``TrainConfig.merge_batches``; ``train.merged_loss``), so at accumulation
20 its phases count per merged batch; ``--no-merge`` runs them one by one.
The forward and backward phases together are ``train.train_step``;
``phase_split_exact`` in the JSON says whether their operators add up to
``train_step``'s own on the same batch. Evaluation is a split run through
the model in batches of ``--eval-batch-size`` on one thread
(``predict_split(workers=1)``): the figures are those of the operator
stream itself, not of sharing batches among cores.

Operators dispatched: in ``torch.profiler.profile(activities=[CPU])``, the
``aten::`` events that have no ``aten::`` event around them -- each is one
call into PyTorch's dispatcher from Python or from the autograd engine
(``aten::linear`` counts once, not with the ``aten::addmm``, ``aten::t`` and
views it calls; `dispatched`). On a GPU each costs the CPU its dispatch, and
all but views launch one or a few kernels: the ``views`` column counts those
that only make a view of their input or return it (`VIEW_OPS`). The JSON
also gives every ``aten::`` event, nested ones included
(``*_all_ops_per_meme``), and the host's reads of a tensor's value
(``aten::_local_scalar_dense``: ``item()``, ``bool()``; a synchronisation
where the tensor is on a GPU) per training step and evaluation batch. A step
dispatches the same operators whatever its batch holds, so the counts per
meme halve when the batch doubles (tests/test_bench.py checks it). They depend
on the sizes only where a path branches on them: mamikit's MADGRAD makes one
multi-tensor call per tile and phase, and one tile holds every parameter
here, where the paper's 116M parameters make about 7 on a GPU
(``optim.DEVICE_TILE_NUMEL``); its views and slices, ten per parameter tensor,
do not change. The folded cross-attention evaluates a batch in one piece
here, as on a GPU (on the CPU at the paper's sizes it goes by pieces).

Per meme: each round trains one batch of each dataset (MAMI's five labels in
three tasks, FBHM's one) and evaluates a split of each, per path, the paths
taking turns (the order reversed every other round); a round's operators and
microseconds are divided by the memes it trained or evaluated. Operators are
counted in one profiled round after the timed ones (the profiler slows what
it records); microseconds are medians over the timed rounds, after warm-up
rounds.

    python bench/step_overhead.py --quick            # about 10 s, start-up included
    python bench/step_overhead.py --threads 1        # the default length, on a CPU other processes share
    python bench/step_overhead.py --accumulation 20  # a window of the paper's 20 batches per round
    python bench/step_overhead.py --quick --compile  # the fast path's step compiled (minutes to compile)

With ``--compile`` the fast path's training step goes through
``train.compiled_step`` (``TrainConfig(compile=True)``), compiled before the
rounds (its seconds reported apart). Its graphs' kernels are inductor's own,
not ``aten::`` events: the operator counts then hold what stays outside the
graphs (extern matrix products, the losses, the autograd engine's
bookkeeping, the optimiser), and ``compiled_kernels`` the kernels generated.

It prints a table, the fast path's most frequent operators in a training
step, and as the last line one JSON object: ``train_ops_per_meme``,
``eval_ops_per_meme``, ``train_us_per_meme``, ``eval_us_per_meme``, per phase
``<phase>_ops_per_meme`` and ``<phase>_us_per_meme`` (phases ``batch``,
``forward``, ``backward``, ``optimizer``), the same prefixed ``reference_``
for the reference path, and the sizes, batch sizes and torch version.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections import Counter, defaultdict

import numpy as np
import torch

from mamikit.batching import SplitData, make_batch
from mamikit.data import dataset_labels
from mamikit.store import SplitFeatures

WIDTH, FEATURE_DIM, FFN_DIM = 32, 16, 64  # model width (the text model's hidden size), CLIP/DETR vectors, FFN
DETR_QUERIES = 20  # stored per meme (the paper's DETR has 100), about one in ten kept
TEXT_TOKENS = (3, 10)  # shortest and longest text, [CLS] and [SEP] included
PAD_TEXT = 12  # the reference's padded text length (make_batch(pack=False)); the paper's is 120
CLS, SEP = 101, 102  # bert-base-uncased's [CLS] and [SEP]
LR, WEIGHT_DECAY, CLIP_NORM = 2e-4, 5e-4, 0.5  # section 4
DATASETS = ("MAMI", "FBHM")
PATHS = ("fast", "reference")
TRAIN_PHASES = ("batch", "forward", "backward", "optimizer")


# ----------------------------------------------------------------------------- model and memes


def build_model(fast_path: bool, dropout: float, seed: int = 0):
    """Experiment 30 at the paper's layer and head counts and tiny widths (same seed -> same weights).

    Returns (model, experiment).
    """
    from transformers import BertConfig, BertModel

    from mamikit.experiments import experiment_tasks, get_experiment
    from mamikit.model import MamiModel, ModelConfig
    from mamikit.profiles import get_profile

    exp = get_experiment("30")
    torch.manual_seed(seed)
    # The frozen text model only sets the width and holds the pooler experiment 30's config asks for: its
    # states come from the memes.
    text = BertModel(BertConfig(vocab_size=128, hidden_size=WIDTH, num_hidden_layers=1, num_attention_heads=4,
                                intermediate_size=FFN_DIM)).eval()
    profile = get_profile("paper", ffn_dim=FFN_DIM, mlp_hidden=WIDTH)  # 6 + 6 layers, 8 heads: the paper's
    cfg = ModelConfig.from_experiment(exp, profile, {"clip": FEATURE_DIM, "detr": FEATURE_DIM},
                                      experiment_tasks(exp), dropout=dropout, fast_path=fast_path,
                                      cls_token_id=CLS, sep_token_id=SEP)
    torch.manual_seed(seed + 1)
    return MamiModel(cfg, text), exp


def make_split(ds: str, n: int, rng: np.random.Generator, split: str = "train") -> SplitData:
    """`n` synthetic memes of dataset `ds` with their features in memory, float16 as the store keeps them."""
    labels = dataset_labels(ds)
    targets = (rng.random((n, len(labels))) < 0.4).astype(np.float32)
    if ds == "MAMI":
        targets[:, 1:] *= targets[:, :1]  # sub-labels only on misogynous memes
    lengths = rng.integers(TEXT_TOKENS[0], TEXT_TOKENS[1] + 1, n)
    text_ids = np.concatenate([np.concatenate([[CLS], rng.integers(1000, 30000, k - 2), [SEP]]) for k in lengths])
    keep = rng.random((n, DETR_QUERIES)) < 0.1
    keep[np.arange(n), rng.integers(0, DETR_QUERIES, n)] = True  # every meme keeps at least one object

    def normal(*shape):
        return torch.from_numpy(rng.normal(0, 1, shape).astype(np.float16))

    ids = [f"{ds.lower()}{i:06d}" for i in range(n)]
    features = SplitFeatures(
        ids=ids, clip=normal(n, 5, FEATURE_DIM), detr=normal(n, DETR_QUERIES, FEATURE_DIM),
        detr_mask=torch.from_numpy(keep.astype(np.uint8)), text_ids=torch.from_numpy(text_ids.astype(np.int32)),
        text_hidden=normal(len(text_ids), WIDTH),
        text_offsets=torch.from_numpy(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)))
    return SplitData(ds, split, ids, np.arange(n), targets, labels, features)


# ----------------------------------------------------------------------------- one path


class StepPath:
    """One path's model, optimiser and data; the phases of a training step and an evaluation, as callables."""

    def __init__(self, name: str, train: dict, evals: dict, dropout: float, eval_batch: int, accumulation: int = 1,
                 merge: bool = True, compile: bool = False):
        import madgrad

        from mamikit.losses import label_pos_weights
        from mamikit.model import param_groups
        from mamikit.optim import MADGRAD

        self.name, self.fast = name, name == "fast"
        self.model, self.exp = build_model(self.fast, dropout)
        self.tasks = self.model.cfg.tasks
        self.train, self.evals, self.eval_batch = train, evals, eval_batch
        self.accumulation = accumulation
        # the fast path merges a window's batches of one dataset (TrainConfig.merge_batches); the reference never
        self.merge = merge and self.fast
        self.pos_weight = label_pos_weights(self.tasks, {ds: (d.targets, d.labels) for ds, d in train.items()})
        groups = param_groups(self.model, WEIGHT_DECAY, self.exp.decay_by_name)
        self.optimizer = MADGRAD(groups, lr=LR) if self.fast else madgrad.MADGRAD(groups, lr=LR)
        # what the training step calls: the model, or on the fast path with --compile train.compiled_step's
        self.compiled = compile and self.fast
        if self.compiled:
            from mamikit.train import compiled_step

            self.step_model = compiled_step(self.model)
        else:
            self.step_model = self.model

    def batch(self, ds: str, index: np.ndarray):
        """The training batch of memes `index`: packed (batch_for), or padded to every query and PAD_TEXT."""
        from mamikit.evaluation import batch_for

        if self.fast:
            return batch_for(self.model, self.exp, self.train[ds], index, True)
        return make_batch(self.train[ds], index, pack=False, text_hidden=True, detr_all=True,
                          max_text_tokens=PAD_TEXT)

    def forward(self, batch, sizes: list[int]):
        """The forward pass and loss of `train.train_step` -> the loss to differentiate, divided by the window.

        Merging (fast path): `train.merged_loss` of the micro-batches of `sizes` memes that `batch` holds.
        """
        from mamikit.losses import dataset_loss

        self.model.train()
        exp = self.exp
        if self.merge:
            from mamikit.train import merged_loss

            return merged_loss(self.step_model, batch, sizes, exp, self.tasks, self.accumulation,
                               pos_weight=self.pos_weight)[0]
        output = self.step_model(batch)
        loss, _ = dataset_loss(output, batch, [t for t in self.tasks if t.dataset == batch.dataset], exp.proj_align,
                               exp.contrastive, pos_weight=self.pos_weight, align_all_pairs=exp.align_all_pairs,
                               contrastive_as_coded=exp.contrastive_as_coded, query_align=exp.query_align)
        return loss / self.accumulation

    def train_step(self, batch):
        """`train.train_step` itself: the forward and backward phases of one batch in one call."""
        from mamikit.train import train_step

        self.model.train()
        return train_step(self.step_model, batch, self.exp, self.tasks, self.accumulation,
                          pos_weight=self.pos_weight)

    def optimizer_step(self) -> None:
        """`train.optimizer_step`: clip (folded into mamikit's MADGRAD; clip_grad_norm_ before the package's), step,
        zero the gradients."""
        from mamikit.train import optimizer_step

        optimizer_step(self.model, self.optimizer, CLIP_NORM)

    def evaluate(self, ds: str) -> dict:
        """Probabilities of the evaluation split of `ds`, as this path evaluates one."""
        from mamikit.evaluation import predict_split

        data = self.evals[ds]
        if self.fast:
            return predict_split(self.model, self.exp, data, self.eval_batch, workers=1)["probs"]
        self.model.eval()
        out: dict[str, list] = {}
        with torch.no_grad():
            for a in range(0, len(data), self.eval_batch):
                index = np.arange(a, min(a + self.eval_batch, len(data)))
                batch = make_batch(data, index, pack=False, text_hidden=True, max_text_tokens=PAD_TEXT)
                for task, logits in self.model(batch).logits.items():
                    out.setdefault(task, []).append(torch.sigmoid(logits))
        return {task: torch.cat(v).numpy() for task, v in out.items()}


def run_round(path: StepPath, windows: list, measure) -> None:
    """The accumulation windows `windows` (each a list of (dataset, memes) batches), an optimiser step after
    each, then an evaluation of each dataset's split.

    A window's batches of one dataset go through as one merged batch where the path merges (`train.train_steps`),
    else one by one. Every phase goes through ``measure(phase, fn, *args)``, which calls ``fn(*args)`` and
    returns its value.
    """
    for window in windows:
        groups = {}
        for k, (ds, index) in enumerate(window):
            groups.setdefault(ds if path.merge else k, []).append((ds, index))
        for group in groups.values():
            index = np.concatenate([i for _, i in group])
            batch = measure("batch", path.batch, group[0][0], index)
            loss = measure("forward", path.forward, batch, [len(i) for _, i in group])
            measure("backward", loss.backward)
        measure("optimizer", path.optimizer_step)
    for ds in DATASETS:
        measure("eval", path.evaluate, ds)


# ----------------------------------------------------------------------------- measuring

PHASES = (*TRAIN_PHASES, "eval")


class Timer:
    """A `measure` for `run_round` that adds up each phase's seconds."""

    def __init__(self):
        self.seconds = dict.fromkeys(PHASES, 0.0)

    def __call__(self, phase: str, fn, *args):
        t0 = time.perf_counter()
        value = fn(*args)
        self.seconds[phase] += time.perf_counter() - t0
        return value


def dispatched(events) -> list[str]:
    """Names of the operators dispatched from Python or the autograd engine, in order: the ``aten::`` events
    with no ``aten::`` event around them.

    `events`: the profiler's raw events (``prof.profiler.kineto_results.events()``). An event is inside
    another when it runs on the same thread within the other's time span: the rule by which
    ``prof.events()`` sets each event's ``cpu_parent`` (`dispatched_by_parents` reads those), without
    building its tree of Python objects, which takes seconds for a training step's events.
    """
    threads = defaultdict(list)
    for e in events:
        threads[e.start_thread_id()].append((e.start_ns(), -e.end_ns(), e.name()))
    names = []
    for rows in threads.values():
        rows.sort()  # by start; of events starting together, the longer (enclosing) one first
        open_ends, aten_open = [], 0  # (end, is aten) of the events enclosing the current one
        for start, neg_end, name in rows:
            while open_ends and open_ends[-1][0] <= start:
                aten_open -= open_ends.pop()[1]
            aten = name.startswith("aten::")
            if aten and not aten_open:
                names.append(name)
            open_ends.append((-neg_end, aten))
            aten_open += aten
    return names


def dispatched_by_parents(function_events) -> list[str]:
    """`dispatched` from ``prof.events()``: the ``aten::`` events none of whose ``cpu_parent`` chain is one."""
    names = []
    for e in function_events:
        if not e.name.startswith("aten::"):
            continue
        parent = e.cpu_parent
        while parent is not None and not parent.name.startswith("aten::"):
            parent = parent.cpu_parent
        if parent is None:
            names.append(e.name)
    return names


# Operators that only make a view of their input or return it (no kernel on a GPU, only the dispatch);
# reshape, contiguous and to are left out: they copy when they must.
VIEW_OPS = frozenset("aten::" + name for name in (
    "view", "_unsafe_view", "view_as", "slice", "select", "narrow", "t", "transpose", "permute", "expand",
    "expand_as", "unsqueeze", "squeeze", "unflatten", "unbind", "split", "split_with_sizes", "chunk", "as_strided",
    "detach", "alias", "lift_fresh", "diagonal"))
SYNC_OP = "aten::_local_scalar_dense"  # a tensor's value read by the host (item, bool(), int()): a sync on a GPU


class OpCounter:
    """A `measure` for `run_round` that profiles each call on its own and adds up per phase: the operators
    dispatched (`dispatched`), those of them in VIEW_OPS, every ``aten::`` event (nested ones included), the
    host reads of a value (SYNC_OP events) and the operators' names."""

    def __init__(self):
        self.ops, self.views, self.all_ops, self.syncs = ({phase: 0 for phase in PHASES} for _ in range(4))
        self.names = {phase: Counter() for phase in PHASES}

    def __call__(self, phase: str, fn, *args):
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            value = fn(*args)
        events = prof.profiler.kineto_results.events()
        names = dispatched(events)
        self.ops[phase] += len(names)
        self.views[phase] += sum(name in VIEW_OPS for name in names)
        self.all_ops[phase] += sum(e.name().startswith("aten::") for e in events)
        self.syncs[phase] += sum(e.name() == SYNC_OP for e in events)
        self.names[phase].update(names)
        return value


def compile_step(path: StepPath, batch_size: int) -> float:
    """Compile `path`'s training step (one forward and backward pass of each dataset, gradients then dropped)
    -> seconds. The timed rounds start compiled; later batch sizes (a merged window) reuse the graphs."""
    t0 = time.perf_counter()
    for ds in DATASETS:
        path.forward(path.batch(ds, np.arange(batch_size)), [batch_size]).backward()
    path.optimizer.zero_grad(set_to_none=True)
    return round(time.perf_counter() - t0, 1)


def compiled_kernels() -> int:
    """Kernels inductor generated for the compiled steps (forward and backward graphs of both datasets)."""
    from torch._inductor import metrics

    return metrics.generated_kernel_count


def train_step_ops(path: StepPath, ds: str, index: np.ndarray) -> tuple[int, int]:
    """Operators of the forward and backward phases on batch `index` of `ds`, and of `train.train_step` on it."""
    split, whole = OpCounter(), OpCounter()
    batch = path.batch(ds, index)
    split("backward", split("forward", path.forward, batch, [len(index)]).backward)
    path.optimizer.zero_grad(set_to_none=True)
    whole("forward", path.train_step, batch)
    path.optimizer.zero_grad(set_to_none=True)
    return split.ops["forward"] + split.ops["backward"], whole.ops["forward"]


def summarise(timers: list[Timer], counter: OpCounter, train_memes: int, eval_memes: int) -> dict:
    """Per meme, each phase's and the training step's operators, views and aten:: events (the counted round)
    and median microseconds (the timed rounds); host reads of a value per round."""
    memes = {phase: eval_memes if phase == "eval" else train_memes for phase in PHASES}
    seconds = {phase: [t.seconds[phase] for t in timers] for phase in PHASES}
    seconds["train"] = [sum(t.seconds[p] for p in TRAIN_PHASES) for t in timers]
    memes["train"] = train_memes
    out = {}
    for phase in ("train", *PHASES):
        parts = TRAIN_PHASES if phase == "train" else (phase,)
        for unit, figures in (("ops", counter.ops), ("view_ops", counter.views), ("all_ops", counter.all_ops)):
            out[f"{phase}_{unit}_per_meme"] = sum(figures[p] for p in parts) / memes[phase]
        out[f"{phase}_us_per_meme"] = 1e6 * statistics.median(seconds[phase]) / memes[phase]
        out[f"{phase}_syncs"] = sum(counter.syncs[p] for p in parts)
    return out


ROWS = [("batch assembly", "batch"), ("forward + loss", "forward"), ("backward", "backward"),
        ("optimiser (clip, step, zero)", "optimizer"), ("training step", "train"), ("evaluation", "eval")]


def print_report(fig: dict, counters: dict, split_exact: dict, args, eval_batch: int, eval_memes: int,
                 steps: int) -> dict:
    """The table and the top operators of the fast path's training step -> those operators per meme."""
    fast, ref = fig["fast"], fig["reference"]
    train_memes = steps * args.batch_size  # `steps`: training batches per round
    merging = "merged by dataset" if not args.no_merge and args.accumulation > 1 else "one by one"
    merging += ", compiled (train.compiled_step)" if args.compile else ""
    print(f"\nexperiment 30's structure (6-layer image encoders and decoder, 8 heads, MAMI + FBHM) at width {WIDTH}; "
          f"training batch {args.batch_size}, an optimiser step per {args.accumulation} batch(es), {merging} on the "
          f"fast path; evaluation {eval_memes} memes per "
          f"dataset in batches of {eval_batch}; dropout {args.dropout}; CPU, {torch.get_num_threads()} threads; "
          f"torch {torch.__version__}")
    print(f"{'per meme':30s}{'operators dispatched':>32s}{'microseconds':>28s}")
    print(f"{'':30s}{'fast':>8s}{'(views)':>8s}{'reference':>10s}{'ratio':>6s}"
          f"{'fast':>10s}{'reference':>12s}{'ratio':>6s}")
    for label, key in ROWS:
        o, v, u = f"{key}_ops_per_meme", f"{key}_view_ops_per_meme", f"{key}_us_per_meme"
        print(f"{label:30s}{fast[o]:>8.1f}{fast[v]:>8.1f}{ref[o]:>10.1f}{ref[o] / fast[o]:>6.2f}"
              f"{fast[u]:>10.0f}{ref[u]:>12.0f}{ref[u] / fast[u]:>6.2f}")
    print(f"(views: operators that only make a view, no kernel on a GPU; reference: "
          f"{ref['train_view_ops_per_meme']:.1f} training, {ref['eval_view_ops_per_meme']:.1f} evaluation)")
    print(f"every aten:: event, nested ones included, per meme: training {fast['train_all_ops_per_meme']:.1f} fast, "
          f"{ref['train_all_ops_per_meme']:.1f} reference; evaluation {fast['eval_all_ops_per_meme']:.1f} fast, "
          f"{ref['eval_all_ops_per_meme']:.1f} reference")
    print("host reads of a tensor's value (a sync where the tensor is on a GPU) per training batch: "
          + "; ".join(f"{name} " + ", ".join(f"{p} {fig[name][f'{p}_syncs'] / steps:g}" for p in TRAIN_PHASES)
                      for name in PATHS))
    print("microseconds per operator dispatched in a training step: "
          + ", ".join(f"{name} {fig[name]['train_us_per_meme'] / fig[name]['train_ops_per_meme']:.1f}"
                      for name in PATHS))
    print("forward + backward operators = train.train_step's on the same batch: "
          + ", ".join(f"{name} {'yes' if ok else 'NO'}" for name, ok in split_exact.items()))
    names = sum((counters["fast"].names[p] for p in TRAIN_PHASES), Counter())
    total = sum(names.values())
    print(f"\nthe fast path's training step: the top {args.top} of its {len(names)} operators by count "
          f"({total / steps:.0f} dispatched per batch of {args.batch_size})")
    print(f"{'operator':32s}{'per batch':>10s}{'per meme':>10s}{'share':>8s}  by phase, per batch")
    for op, n in names.most_common(args.top):
        where = ", ".join(f"{p} {counters['fast'].names[p][op] / steps:g}" for p in TRAIN_PHASES
                          if counters["fast"].names[p][op])
        print(f"{op:32s}{n / steps:>10.1f}{n / train_memes:>10.2f}{n / total:>8.1%}  {where}")
    return {op: round(n / train_memes, 3) for op, n in names.most_common(args.top)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1 warm-up + 3 timed rounds, one evaluation batch per "
                                                         "dataset (about 10 s)")
    ap.add_argument("--rounds", type=int, default=None, help="timed rounds (default 15; --quick 3)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed rounds before timing (default 3; --quick 1)")
    ap.add_argument("--batch-size", type=int, default=16, help="memes per training batch (paper: 16)")
    ap.add_argument("--accumulation", type=int, default=1,
                    help="batches per optimiser step (paper: 20); a round trains one window of them, the datasets "
                         "taking turns (with 1: one batch of each dataset, a step after each)")
    ap.add_argument("--no-merge", action="store_true",
                    help="the fast path runs a window's batches one by one (TrainConfig(merge_batches=False))")
    ap.add_argument("--eval-batch-size", type=int, default=None,
                    help="memes per evaluation batch, both paths (default: TrainConfig's eval_batch_size)")
    ap.add_argument("--eval-memes", type=int, default=None,
                    help="memes per dataset in each evaluation (default: two evaluation batches; --quick: one)")
    ap.add_argument("--compile", action="store_true",
                    help="the fast path's training step compiled (TrainConfig(compile=True), train.compiled_step); "
                         "the compile's seconds are reported apart")
    ap.add_argument("--dropout", type=float, default=0.1, help="model dropout while training (the paper's 0.1)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch.set_num_threads (default: PyTorch's); 1 on a CPU other processes share")
    ap.add_argument("--top", type=int, default=10, help="operators listed from the fast path's training step")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    from mamikit.settings import TrainConfig

    if args.threads:
        torch.set_num_threads(args.threads)
    args.rounds = args.rounds or (3 if args.quick else 15)
    args.warmup = (1 if args.quick else 3) if args.warmup is None else args.warmup
    eval_batch = args.eval_batch_size or TrainConfig().eval_batch_size
    eval_memes = args.eval_memes or eval_batch * (1 if args.quick else 2)
    if min(args.rounds, args.batch_size, eval_batch, eval_memes, args.accumulation) < 1 or args.warmup < 0:
        raise SystemExit("--rounds, --batch-size, --accumulation, --eval-batch-size and --eval-memes must be "
                         "positive, --warmup not negative")
    load = os.getloadavg()[0]
    t_start = time.perf_counter()
    rng = np.random.default_rng(args.seed)
    n_train = 4 * args.batch_size
    train = {ds: make_split(ds, n_train, rng) for ds in DATASETS}
    evals = {ds: make_split(ds, eval_memes, rng, "dev") for ds in DATASETS}
    paths = {name: StepPath(name, train, evals, args.dropout, eval_batch, args.accumulation, not args.no_merge,
                            args.compile) for name in PATHS}
    compile_seconds = compile_step(paths["fast"], args.batch_size) if args.compile else None
    # A round's windows: two of one batch (one per dataset) at accumulation 1, else one window whose batches
    # alternate between the datasets; batches are slices of permutations, both paths alike.
    n_rounds = args.warmup + args.rounds + 1
    n_windows = 2 if args.accumulation == 1 else 1
    per_round = n_windows * args.accumulation
    n_batches = n_rounds * per_round
    orders = {ds: np.concatenate([rng.permutation(n_train) for _ in range(n_batches // 4 + 1)]) for ds in DATASETS}
    taken = dict.fromkeys(DATASETS, 0)
    plan = []
    for _ in range(n_rounds):
        batches = []
        for k in range(per_round):
            ds = DATASETS[k % len(DATASETS)]
            batches.append((ds, orders[ds][taken[ds]:taken[ds] + args.batch_size]))
            taken[ds] += args.batch_size
        plan.append([batches[w * args.accumulation:(w + 1) * args.accumulation] for w in range(n_windows)])

    timers = {name: [] for name in PATHS}
    for k, batches in enumerate(plan[:-1]):
        for name in (PATHS if k % 2 == 0 else PATHS[::-1]):  # turns, so that a drifting host slows both alike
            timer = Timer()
            run_round(paths[name], batches, timer)
            if k >= args.warmup:
                timers[name].append(timer)
    counters = {name: OpCounter() for name in PATHS}
    split_exact = {}
    for name, path in paths.items():
        run_round(path, plan[-1], counters[name])
        phases, whole = train_step_ops(path, "MAMI", plan[-1][0][0][1])
        split_exact[name] = phases == whole
    fig = {name: summarise(timers[name], counters[name], per_round * args.batch_size,
                           len(DATASETS) * eval_memes) for name in PATHS}
    top = print_report(fig, counters, split_exact, args, eval_batch, eval_memes, per_round)
    print(f"wall time {time.perf_counter() - t_start:.1f} s; load average at the start {load:.1f}")
    if args.compile:
        print(f"compiling the fast path's step: {compile_seconds} s before the rounds, {compiled_kernels()} kernels "
              f"generated (inductor's C++ kernels are not aten:: events: the operator counts leave them out)")

    summary = {}
    n_eval_batches = len(DATASETS) * -(-eval_memes // eval_batch)
    for prefix, name in (("", "fast"), ("reference_", "reference")):
        f = fig[name]
        for key in ("train", "eval", *TRAIN_PHASES):
            for unit, digits in (("ops", 2), ("view_ops", 2), ("all_ops", 2), ("us", 1)):
                summary[f"{prefix}{key}_{unit}_per_meme"] = round(f[f"{key}_{unit}_per_meme"], digits)
        summary[f"{prefix}train_ops_per_step"] = round(f["train_ops_per_meme"] * args.batch_size, 1)
        summary[f"{prefix}train_syncs_per_step"] = f["train_syncs"] / per_round
        summary[f"{prefix}forward_syncs_per_step"] = f["forward_syncs"] / per_round
        summary[f"{prefix}eval_syncs_per_batch"] = f["eval_syncs"] / n_eval_batches
    cfg = paths["fast"].model.cfg
    summary.update({
        "phase_split_exact": all(split_exact.values()),
        "top_train_ops_per_meme": top,
        "batch_size": args.batch_size, "eval_batch_size": eval_batch, "eval_memes": eval_memes,
        "width": WIDTH, "feature_dim": FEATURE_DIM, "ffn_dim": FFN_DIM, "detr_queries": DETR_QUERIES,
        "encoder_layers": cfg.encoder_layers, "decoder_layers": cfg.decoder_layers, "num_heads": cfg.num_heads,
        "trainable_parameters": sum(p.numel() for p in paths["fast"].model.parameters() if p.requires_grad),
        "trainable_tensors": sum(1 for p in paths["fast"].model.parameters() if p.requires_grad),
        "optimizer_steps_per_batch": round(1 / args.accumulation, 4), "accumulation": args.accumulation,
        "merge": not args.no_merge, "compile": args.compile, "compile_seconds": compile_seconds,
        "compiled_kernels": compiled_kernels() if args.compile else None, "dropout": args.dropout,
        "rounds": args.rounds, "warmup": args.warmup,
        "threads": torch.get_num_threads(), "torch": torch.__version__, "load_average_at_start": round(load, 2),
        "seconds": round(time.perf_counter() - t_start, 1),
    })
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
