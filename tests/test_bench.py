"""Tests of the benchmarks' legs (bench/train_throughput.py, bench/epoch_time.py) at tiny sizes (section 4),
and of bench/step_overhead.py's operator counts.

The cached-text leg must be the authors' straightforward path with one change,
the text encoder's states read instead of computed; the speedups must divide
timings taken in the same round.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import BertConfig, BertModel

from mamikit.data import load_tasks
from mamikit.losses import dataset_loss
from mamikit.model import MamiModel
from model_configs import model_config

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import step_overhead  # noqa: E402
import train_throughput as tt  # noqa: E402

D = 32
TASKS = tuple(task for tasks in load_tasks().values() for task in tasks)


def _text_model() -> BertModel:
    torch.manual_seed(0)  # bert-base's vocabulary: the synthetic memes draw ids up to 30,000
    config = BertConfig(hidden_size=D, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    return BertModel(config, add_pooling_layer=False).eval()


@pytest.fixture(scope="module")
def legs(tmp_path_factory):
    """Six MAMI and four FBHM memes (float32 text states) as each leg stores them, and the tiny text model."""
    work = tmp_path_factory.mktemp("bench-legs")
    text = _text_model()
    memes = tt.make_memes(text, {"MAMI": 6, "FBHM": 4}, seed=0, dtype=np.float32)
    tt.write_store(work / "store", memes)
    for leg, folder in tt.MEME_DIRS.items():
        tt.write_meme_files(work / folder, memes, text_hidden=leg == "cached_text")
    sources = {leg: tt.batch_source(work, leg, "MAMI", m["ids"], m["targets"], m["labels"])
               for leg in tt.LEGS for m in [memes["MAMI"]]}
    return sources, text


def test_cached_text_leg_carries_the_stored_states_in_the_padded_layout(legs):
    from mamikit.batching import make_batch

    sources, _ = legs
    index = np.array([4, 0, 2])
    cached, reference = sources["cached_text"].batch(index), sources["reference"].batch(index)
    store = make_batch(sources["mamikit"].data, index, pack=False, text_hidden=True, detr_all=True,
                       max_text_tokens=tt.MAX_TEXT)
    assert reference.text_hidden is None  # the authors' protocol runs the text encoder
    assert cached.text_hidden.shape == (3, tt.MAX_TEXT, D)
    for name in ("text_ids", "text_mask", "text_hidden", "detr", "detr_mask", "clip", "targets"):
        assert torch.equal(getattr(cached, name), getattr(store, name)), name
        if name != "text_hidden":
            assert torch.equal(getattr(cached, name), getattr(reference, name)), name


def test_cached_text_leg_computes_the_reference_loss(legs):
    """Same weights, same memes: reading the states gives the loss of running the text encoder."""
    sources, text = legs
    cfg = model_config(TASKS, tt.CLIP_DIM, tt.DETR_DIM, encoder_layers=1, decoder_layers=1, num_heads=4,
                       mlp_hidden=16, ffn_dim=48, dropout=0.0, cls_token_id=tt.CLS, sep_token_id=tt.SEP,
                       fast_path=False)
    torch.manual_seed(1)
    model = MamiModel(cfg, text).train()
    index = np.array([1, 3, 5, 0])
    losses, calls = {}, []
    hook = text.register_forward_hook(lambda *_: calls.append(1))
    try:
        for leg in ("reference", "cached_text"):
            batch = sources[leg].batch(index)
            _, terms = dataset_loss(model(batch), batch, TASKS, proj_align=True, contrastive=True)
            losses[leg] = float(terms["loss"])
            calls.append(leg)
    finally:
        hook.remove()
    assert calls == [1, "reference", "cached_text"]  # the text encoder ran for the reference only
    assert losses["cached_text"] == pytest.approx(losses["reference"], abs=1e-5)


def test_speedup_is_the_median_of_per_round_ratios():
    # The host doubles its speed after round 1: every round's ratio is 10 but for one outlier round.
    slow, fast = [10.0, 5.0, 5.0, 9.0], [1.0, 0.5, 0.5, 3.0]
    assert tt.paired_speedup(slow, fast) == 10.0
    assert tt.paired_speedup([2.0], [4.0]) == 0.5
    with pytest.raises(ValueError, match="3 against 2 rounds"):
        tt.paired_speedup([1.0, 1.0, 1.0], [1.0, 1.0])


def test_round_seconds_charge_a_share_of_the_optimiser_step():
    steps = [{"timed": False, "batch_s": 9.0, "optimizer_s": 9.0},
             {"timed": True, "batch_s": 1.0, "optimizer_s": 2.0},
             {"timed": True, "batch_s": 3.0, "optimizer_s": 4.0}]
    assert tt.round_seconds({"steps": steps}, 20) == [1.1, 3.2]
    assert tt.round_seconds({"steps": steps}, 1) == [3.0, 7.0]


# ----------------------------------------------------------------------------- bench/step_overhead.py


def _step_overhead(capsys, batch_size: int) -> dict:
    """`step_overhead.py --quick` with one timed round at training batch `batch_size` (evaluation batches twice
    that) -> its JSON line."""
    threads = torch.get_num_threads()
    try:
        assert step_overhead.main(["--quick", "--rounds", "1", "--threads", "1", "--batch-size", str(batch_size),
                                   "--eval-batch-size", str(2 * batch_size)]) == 0
    finally:
        torch.set_num_threads(threads)
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_step_overhead_counts_operators_per_meme(capsys):
    small, large = _step_overhead(capsys, 4), _step_overhead(capsys, 8)
    for path in ("", "reference_"):
        for key in ("train", "eval", "batch", "forward", "backward", "optimizer"):
            assert small[f"{path}{key}_ops_per_meme"] > 0, path + key
            assert small[f"{path}{key}_us_per_meme"] > 0, path + key
            assert small[f"{path}{key}_all_ops_per_meme"] >= small[f"{path}{key}_ops_per_meme"], path + key
        phases = sum(small[f"{path}{p}_ops_per_meme"] for p in ("batch", "forward", "backward", "optimizer"))
        assert phases == pytest.approx(small[f"{path}train_ops_per_meme"], abs=0.05)
        # A step dispatches the same operators whatever the batch holds (no loop over memes): per meme, a
        # batch twice as large halves them; an evaluation batch likewise.
        for key, size in (("train", "batch_size"), ("eval", "eval_batch_size")):
            assert (small[f"{path}{key}_ops_per_meme"] * small[size]
                    == pytest.approx(large[f"{path}{key}_ops_per_meme"] * large[size], rel=0.01)), path + key
    assert small["phase_split_exact"]  # forward + backward are train.train_step's operators, no more, no fewer
    # The packed encoders and folded cross-attention call fewer operators than the stock modules on the grid.
    for key in ("forward", "backward"):
        assert small[f"{key}_ops_per_meme"] < small[f"reference_{key}_ops_per_meme"], key
    assert small["batch_size"] == 4 and large["batch_size"] == 8 and small["torch"] == torch.__version__
    assert 0 < len(small["top_train_ops_per_meme"]) <= 10


def test_step_overhead_nesting_matches_the_profilers_tree():
    """`dispatched` reads the raw events' time spans; it must find the operators that `prof.events()`'s
    parent links call top-level."""
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(8, 2, 16, batch_first=True)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        layer(torch.randn(3, 5, 8), src_key_padding_mask=torch.rand(3, 5) < 0.3).sum().backward()
    names = step_overhead.dispatched(prof.profiler.kineto_results.events())
    assert len(names) > 20 and "aten::addmm" not in names  # inside aten::linear
    assert Counter(names) == Counter(step_overhead.dispatched_by_parents(prof.events()))
