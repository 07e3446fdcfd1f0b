"""Stored outputs of a fixed-seed forward pass of every architecture (sections 3.1-3.5) and the command writing them.

The two-path tests (fast path against the stock modules) cannot see a bug
both paths share. These cases pin the numbers themselves: for experiments
00, 01, 03, 10, 13 and 30 under both recipes, a toy-sized model (hidden size
32, two layers everywhere) reads a few memes made from seeded generators, and
its logits, the norms of its MLP heads' inputs and the loss terms of eq. 5-6
are kept in ``tests/fixtures/regression.json``. `tests/test_regression.py`
compares them with a tolerance of 1e-5: in eval mode on the fast path (packed
batches) and on the reference path (``fast_path=False``, padded batches), and
in train mode (dropout live, torch seeded) on the fast path.

Everything the numbers depend on is built in :func:`build_case`, so that a
change of the configuration API means editing that one function while the
stored numbers stay as they are. Weights are not left to the modules'
initialisers: every parameter is refilled from a generator seeded by its name
(:func:`fill_parameters`), so reordering the construction of submodules does
not move the numbers, and renaming a parameter does (it renames a checkpoint
entry too).

When a change of the numbers is meant (a fixed bug, a new switch value),
regenerate the file and commit it with the change that explains it::

    python -m tests.regression_cases --write     # or: make fixtures
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import BertConfig, BertModel

from mamikit.batching import SplitData, make_batch
from mamikit.experiments import Experiment, get_experiment
from mamikit.losses import dataset_loss, label_pos_weights
from mamikit.model import Batch, MamiModel, ModelConfig
from mamikit.profiles import Profile
from mamikit.registry import Task
from mamikit.store import SplitFeatures

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "regression.json"
EXPERIMENTS = ("00", "01", "03", "10", "13", "30")
RECIPES = ("paper", "authors")
CASES = tuple(f"{name}/{recipe}" for name in EXPERIMENTS for recipe in RECIPES)
TOLERANCE = 1e-5
SEED = 0

# Table 1's tasks, written out rather than read from mamikit/tasks.json: a task added there must not move these
# numbers.
TASKS = (
    Task("MAMI", "MAMI", ("misogynous", "shaming", "stereotype", "objectification", "violence")),
    Task("Task_A", "MAMI", ("misogynous",)),
    Task("Task_B", "MAMI", ("shaming", "stereotype", "objectification", "violence")),
    Task("Hateful", "FBHM", ("hateful",)),
)
LABELS = {"MAMI": TASKS[0].labels, "FBHM": ("hateful",)}
# Gold labels chosen by hand: every label has a positive and a negative meme (eq. 3-4 then sees both kinds of pair).
TARGETS = {
    "MAMI": [[1, 1, 0, 1, 0], [0, 0, 0, 0, 0], [1, 0, 1, 0, 1], [1, 1, 1, 0, 0]],
    "FBHM": [[1], [0], [0], [1]],
}
# Real text tokens per meme, [CLS] and [SEP] included; the reference path pads them to PADDED_TEXT.
TEXT_LENGTHS = {"MAMI": (9, 5, 12, 3), "FBHM": (7, 11, 4, 6)}
PADDED_TEXT = 16
HIDDEN, VOCAB, CLIP_DIM, DETR_DIM, DETR_SLOTS = 32, 120, 24, 16, 100
# The sizes of the trainable parts (a profile's fields); no backbone is loaded.
PROFILE = Profile(name="regression", clip_model="-", clip_pretrained=None, detr_model="-", text_model="-",
                  encoder_layers=2, decoder_layers=2, num_heads=4, ffn_dim=48, mlp_hidden=16)


@dataclass
class Case:
    """One architecture with its weights and its inputs, ready to run."""

    experiment: Experiment
    model: MamiModel
    batches: dict[str, Batch]  # dataset -> its batch: packed on the fast path, padded on the reference path
    pos_weight: dict | None  # eq. 1's {task: {label: weight}}, counted on the batches' targets


def _generator(seed: int, name: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(name.encode())])


@torch.no_grad()
def fill_parameters(model: torch.nn.Module, seed: int = SEED) -> None:
    """Refill every parameter from a generator seeded by (seed, its name), in name order.

    Matrices get N(0, 1/fan_in), vectors named ``*.weight`` (LayerNorms) 1 + N(0, 0.01), other vectors N(0, 0.01).
    Parameters over one storage (the authors' tied embeddings) stay tied: the last name in order writes it.
    """
    for name, p in sorted(model.named_parameters(), key=lambda item: item[0]):
        values = _generator(seed, name).standard_normal(tuple(p.shape))
        if p.ndim >= 2:
            values = values / math.sqrt(p.shape[-1])
        else:
            values = (1.0 if name.endswith(".weight") else 0.0) + 0.1 * values
        p.copy_(torch.from_numpy(values))


def _text_model() -> BertModel:
    config = BertConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=128)
    config._attn_implementation = "eager"  # noqa: SLF001  the plainest kernel; sdpa gives the same numbers to 1e-6
    torch.manual_seed(SEED)
    return BertModel(config).eval()


@torch.no_grad()
def _features(dataset: str, text_model: BertModel) -> SplitFeatures:
    """A store split of four memes from a generator seeded by the dataset's name; text states from `text_model`."""
    rng = _generator(SEED, f"inputs/{dataset}")
    n = len(TEXT_LENGTHS[dataset])
    ids = [np.concatenate([[101], rng.integers(103, VOCAB, k - 2), [102]]) for k in TEXT_LENGTHS[dataset]]
    keep = rng.random((n, DETR_SLOTS)) < 0.08
    keep[0, :] = False
    keep[0, DETR_SLOTS - 1] = True  # one meme keeps only the last query: its slot and its rank differ most
    keep[:, 5] |= ~keep.any(1)
    was_training = text_model.training
    text_model.eval()
    hidden = [text_model(input_ids=torch.from_numpy(x[None])).last_hidden_state[0] for x in ids]  # (T_i, D) each
    text_model.train(was_training)
    feats = SplitFeatures(ids=[f"{dataset.lower()}{i}" for i in range(n)])
    feats.clip = torch.from_numpy(rng.standard_normal((n, 5, CLIP_DIM)).astype(np.float32))
    feats.detr = torch.from_numpy(rng.standard_normal((n, DETR_SLOTS, DETR_DIM)).astype(np.float32))
    feats.detr_mask = torch.from_numpy(keep)
    feats.text_ids = torch.from_numpy(np.concatenate(ids).astype(np.int32))
    feats.text_hidden = torch.cat(hidden).float()
    feats.text_offsets = torch.from_numpy(np.concatenate([[0], np.cumsum(TEXT_LENGTHS[dataset])]).astype(np.int64))
    return feats


def build_case(case: str, fast_path: bool = True) -> Case:
    """The model and inputs of `case` ("<experiment>/<recipe>"): fast path on packed batches, or the reference path.

    Both paths get the same weights and the same memes; only the layout of the
    batches (packed DETR queries and text, or 100 queries and PADDED_TEXT
    tokens) and ``ModelConfig.fast_path`` differ.
    """
    name, recipe = case.split("/")
    experiment = get_experiment(name, recipe=recipe)
    tasks = tuple(t for t in TASKS if t.dataset in experiment.datasets)
    cfg = ModelConfig.from_experiment(experiment, PROFILE, {"clip": CLIP_DIM, "detr": DETR_DIM}, tasks,
                                      fast_path=fast_path, cls_token_id=101, sep_token_id=102)  # uncased BERT's
    torch.manual_seed(SEED)
    model = MamiModel(cfg, _text_model())
    fill_parameters(model)
    batches, targets = {}, {}
    for dataset in experiment.datasets:
        feats = _features(dataset, model.text_model)
        y = np.array(TARGETS[dataset], dtype=np.float32)
        split = SplitData(dataset, "train", list(feats.ids), np.arange(len(feats.ids)), y, LABELS[dataset], feats)
        batches[dataset] = make_batch(split, np.arange(len(split)), image_encoders=experiment.image_encoders,
                                      pack=fast_path, detr_all=experiment.proj_align, max_text_tokens=PADDED_TEXT)
        targets[dataset] = (y, LABELS[dataset])
    pos_weight = label_pos_weights(tasks, targets) if experiment.pos_weight else None
    return Case(experiment, model, batches, pos_weight)


def run_case(case: Case, train: bool = False) -> dict:
    """Logits, MLP-input norms and loss terms of every batch of `case`, as nested lists of floats.

    Eval mode runs without autograd; train mode seeds torch first (the dropout
    masks) and keeps autograd on, as a training step does.
    """
    model, exp = case.model, case.experiment
    model.train(train)
    out = {}
    for dataset, batch in case.batches.items():
        if train:
            torch.manual_seed(SEED)
        with torch.set_grad_enabled(train):
            output = model(batch)
            _, terms = dataset_loss(output, batch, model.cfg.tasks, exp.proj_align, exp.contrastive,
                                    pos_weight=case.pos_weight, align_all_pairs=exp.align_all_pairs,
                                    contrastive_as_coded=exp.contrastive_as_coded)
        out[dataset] = {
            "logits": {task: logits.detach().tolist() for task, logits in output.logits.items()},  # (B, k)
            # The norm of each head's input (B, k): moves with the encoders and the decoder, not with the heads.
            "head_input_norm": {task: inputs[0].detach().norm(dim=-1).tolist()
                                for task, inputs in output.mlp_inputs.items()},
            "loss": {key: float(value) for key, value in sorted(terms.items())},
        }
    return out


def compute(case: str) -> dict:
    """The stored record of one case: eval mode on the fast path, train mode on the fast path."""
    fast = build_case(case, fast_path=True)
    return {"eval": run_case(fast, train=False), "train": run_case(fast, train=True)}


def flatten(record, prefix: str = "") -> dict[str, np.ndarray]:
    """Nested dicts of numbers -> {"a/b/c": array}, for comparing two records key by key."""
    if isinstance(record, dict):
        out = {}
        for key, value in record.items():
            out.update(flatten(value, f"{prefix}/{key}" if prefix else key))
        return out
    return {prefix: np.asarray(record, dtype=np.float64)}


def load_fixture(path: Path = FIXTURE) -> dict:
    """The stored cases, {case: record}."""
    return json.loads(path.read_text(encoding="utf-8"))["cases"]


def write_fixture(path: Path = FIXTURE) -> Path:
    """Compute every case and write them to `path`."""
    data = {
        "about": "Fixed-seed forward passes of tests/regression_cases.py; regenerate with "
                 "`python -m tests.regression_cases --write` (or `make fixtures`) only when a change is meant.",
        "torch": torch.__version__,
        "cases": {case: compute(case) for case in CASES},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    return path


def main(argv=None) -> int:
    """`python -m tests.regression_cases [--write]`: how far each case is from the stored numbers, or rewrite them."""
    parser = argparse.ArgumentParser(prog="python -m tests.regression_cases", description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="recompute every case and overwrite the fixture file")
    args = parser.parse_args(argv)
    if args.write:
        print(f"wrote {write_fixture()}")
        return 0
    stored, differ = load_fixture(), 0
    for case in CASES:
        want, got = flatten(stored.get(case, {})), flatten(compute(case))
        worst = max((float(np.abs(got[k] - want[k]).max()) for k in want.keys() & got.keys()), default=0.0)
        same_keys = want.keys() == got.keys()
        differ += worst > TOLERANCE or not same_keys
        print(f"{case:<12} largest difference {worst:.2e}{'' if same_keys else ' (other entries)'}")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
