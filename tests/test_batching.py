"""Tests of mamikit.batching: packed vs padded batches from the store, algorithm 1's sampler (sections 3.1, 3.4, 4).

The fast path (packed batches, cached text states, the model's packed encoders
and folded cross-attention) is checked against the straightforward one
(padded batches, the text model run on ids, stock PyTorch modules).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from transformers import BertConfig, BertModel

from mamikit.batching import SplitData, epoch_batches, make_batch
from mamikit.data import load_tasks
from mamikit.store import FeatureStore, write_split
from mamikit.losses import dataset_loss
from mamikit.fastpath import head_matmul
from mamikit.model import MamiModel, folded_cross_attention, packed_encoder
from model_configs import model_config

D, CLIP_DIM, DETR_DIM, VOCAB, MAX_TEXT = 32, 24, 16, 120, 120
MAMI_LABELS = ("misogynous", "shaming", "stereotype", "objectification", "violence")
TASKS = tuple(task for tasks in load_tasks().values() for task in tasks)  # table 1: MAMI, Task_A, Task_B, Hateful


def _text_model() -> BertModel:
    torch.manual_seed(0)
    config = BertConfig(vocab_size=VOCAB, hidden_size=D, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=128)
    return BertModel(config, add_pooling_layer=False).eval()


def _model(text: BertModel, dropout: float = 0.1) -> MamiModel:
    torch.manual_seed(1)
    cfg = model_config(TASKS, CLIP_DIM, DETR_DIM, encoder_layers=2, decoder_layers=2, num_heads=4, mlp_hidden=16,
                       ffn_dim=48, dropout=dropout)
    return MamiModel(cfg, text)


@torch.no_grad()
def _write_store(root, n: int, text: BertModel | None, seed: int = 0, dtype=np.float32) -> dict:
    """A MAMI train split in the store layout `extract` writes; returns the raw arrays too.

    The text states are the text model's (random without one). float32 keeps
    the cached states exact, so that they can be compared with running the model.
    """
    rng = np.random.default_rng(seed)
    lengths = rng.integers(3, 40, n)
    lengths[:3] = (MAX_TEXT, 3, 17)  # the longest allowed, the shortest, one in between
    ids = [np.concatenate([[101], rng.integers(103, VOCAB, k - 2), [102]]).astype(np.int32) for k in lengths]
    if text is None:
        states = [rng.normal(size=(k, D)) for k in lengths]
    else:
        states = [text(input_ids=torch.from_numpy(x[None].astype(np.int64))).last_hidden_state[0].numpy() for x in ids]
    mask = rng.random((n, 100)) < 0.1
    mask[:, 7] |= ~mask.any(1)  # every meme keeps at least one query
    mask[0], mask[1], mask[2] = True, False, False  # all 100 kept; exactly one kept (the last query)
    mask[1, 99] = mask[2, 0] = True
    arrays = {
        "clip": rng.normal(size=(n, 5, CLIP_DIM)).astype(dtype),
        "detr": rng.normal(size=(n, 100, DETR_DIM)).astype(dtype),
        "logits": rng.normal(size=(n, 100, 92)).astype(dtype),
        "mask": mask.astype(np.uint8),
        "input_ids": ids,
        "hidden": [s.astype(dtype) for s in states],
        "offsets": np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
    }
    meme_ids = [f"{i:05d}" for i in range(n)]
    write_split(root, "MAMI", "train", meme_ids, {
        "clip": {"embeds": arrays["clip"]},
        "detr": {"embeds": arrays["detr"], "logits": arrays["logits"], "mask": arrays["mask"]},
        "text": {"input_ids": ids, "hidden": arrays["hidden"], "offsets": arrays["offsets"]},
    })
    return arrays


def _split(root, n: int, seed: int = 0) -> SplitData:
    """The store's split as train.py sees it, memes listed in reverse so that positions differ from rows."""
    feats = FeatureStore(root).load("MAMI", "train")
    ids = feats.ids[::-1]
    targets = (np.random.default_rng(seed).random((n, 5)) < 0.4).astype(np.float32)
    return SplitData("MAMI", "train", ids, feats.rows(ids), targets, MAMI_LABELS, feats)


@pytest.fixture(scope="module")
def text():
    return _text_model()


@pytest.fixture(scope="module")
def store(tmp_path_factory, text):
    root = tmp_path_factory.mktemp("store")
    n = 40
    return root, n, _write_store(root, n, text)


# ------------------------------------------------------------------ packed vs padded layout


@pytest.mark.parametrize("index", [[0, 1, 2, 3], [5, 39, 1, 12, 20], list(range(40))])
def test_packed_batch_holds_the_padded_batch_tokens(store, index):
    root, n, raw = store
    data = _split(root, n)
    packed = make_batch(data, index, pack=True, text_hidden=True, detr_all=True)
    padded = make_batch(data, index, pack=False, text_hidden=True, detr_all=True)
    rows = data.rows[index]
    assert packed.ids == padded.ids == [data.ids[i] for i in index]
    assert torch.equal(packed.targets, torch.from_numpy(data.targets[index]))
    assert torch.equal(packed.clip, torch.from_numpy(raw["clip"][rows]).float())
    assert torch.equal(packed.detr_all, padded.detr_all)
    assert torch.equal(padded.detr_all, torch.from_numpy(raw["detr"][rows]).float())

    kept = raw["mask"][rows].astype(bool)
    assert padded.detr.shape[1] == 100 and packed.detr.shape[1] == kept.sum(1).max()
    lengths = np.diff(raw["offsets"])[rows]
    assert padded.text_ids.shape[1] == MAX_TEXT and packed.text_ids.shape[1] == lengths.max()
    for i, row in enumerate(rows):
        # DETR: the same kept vectors, in their order, at the front of the packed row.
        expected = torch.from_numpy(raw["detr"][row][kept[i]]).float()
        m = packed.detr_mask[i]
        assert torch.equal(packed.detr[i][m], expected)
        assert torch.equal(padded.detr[i][padded.detr_mask[i]], expected)
        assert m[: kept[i].sum()].all() and not m[kept[i].sum():].any()
        # Text: the same real tokens and cached states, zeros after them.
        k = lengths[i]
        start = raw["offsets"][row]
        for batch in (packed, padded):
            assert batch.text_mask[i, :k].all() and not batch.text_mask[i, k:].any()
            assert torch.equal(batch.text_ids[i, :k], torch.from_numpy(raw["input_ids"][row].astype(np.int64)))
            assert not batch.text_ids[i, k:].any() and not batch.text_hidden[i, k:].any()
            stored = np.concatenate(raw["hidden"])[start:start + k]
            assert torch.equal(batch.text_hidden[i, :k], torch.from_numpy(stored).float())


def test_batch_options_leave_out_what_is_not_asked(store):
    root, n, _ = store
    data = _split(root, n)
    batch = make_batch(data, [3, 4], image_encoders=("clip",), pack=True, text_hidden=False, detr_all=False)
    assert batch.detr is None and batch.detr_mask is None and batch.detr_all is None
    assert batch.text_hidden is None and batch.clip.shape == (2, 5, CLIP_DIM)
    batch = make_batch(data, [3, 4], image_encoders=("detr",), pack=True, detr_all=False)
    assert batch.clip is None and batch.detr_all is None and batch.detr.dtype == torch.float32


def _loss(model, batch):
    out = model(batch)
    loss, _ = dataset_loss(out, batch, TASKS, proj_align=True, contrastive=True)
    return out, loss


def test_packed_and_padded_batches_give_the_same_logits_and_loss(store, text):
    """Fast path (packed, cached text states) against the straightforward one (padded, text model run on ids)."""
    root, n, _ = store
    data = _split(root, n)
    model = _model(text).eval()
    index = [0, 1, 2, 9, 14, 30]
    packed = make_batch(data, index, pack=True, text_hidden=True, detr_all=True)
    padded = make_batch(data, index, pack=False, text_hidden=False, detr_all=True)
    assert padded.text_hidden is None
    with torch.no_grad():
        out_p, loss_p = _loss(model, packed)
        out_r, loss_r = _loss(model, padded)
    for task in ("MAMI", "Task_A", "Task_B"):
        torch.testing.assert_close(out_p.logits[task], out_r.logits[task], atol=1e-5, rtol=0)
    assert abs(float(loss_p) - float(loss_r)) < 1e-5


def test_packed_and_padded_batches_give_the_same_gradients(store, text):
    root, n, _ = store
    data = _split(root, n)
    model = _model(text, dropout=0.0).train()
    index = [2, 5, 8, 11, 0]
    grads = []
    for batch in (make_batch(data, index, pack=True, detr_all=True),
                  make_batch(data, index, pack=False, text_hidden=False, detr_all=True)):
        model.zero_grad(set_to_none=True)
        _loss(model, batch)[1].backward()
        grads.append({k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 50
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=2e-5, rtol=1e-4, msg=name)


# ------------------------------------------------------------------ the model's fast path vs stock modules


@pytest.mark.parametrize("norm_first", [False, True])
def test_packed_encoder_equals_the_stock_encoder_on_real_tokens(norm_first):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(D, 4, 48, 0.0, batch_first=True, norm_first=norm_first)
    encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False, norm=nn.LayerNorm(D) if norm_first else None)
    x = torch.randn(3, 9, D, requires_grad=True)
    mask = torch.rand(3, 9) < 0.5
    mask[:, 0] = True
    mask[1] = True  # one row without padding
    expected = encoder(x, src_key_padding_mask=~mask)
    got = packed_encoder(encoder, x, mask)
    torch.testing.assert_close(got[mask], expected[mask], atol=1e-5, rtol=1e-5)
    assert not got[~mask].any()
    weights = [x] + list(encoder.parameters())
    g_expected = torch.autograd.grad(expected[mask].square().sum(), weights)
    g_got = torch.autograd.grad(got[mask].square().sum(), weights)
    for a, b in zip(g_got, g_expected):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    full = torch.ones(3, 9, dtype=torch.bool)
    torch.testing.assert_close(packed_encoder(encoder, x, full), encoder(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("activation", ["relu", "gelu"])
@pytest.mark.parametrize("norm_first", [False, True])
def test_packed_encoder_at_inference_equals_the_stock_encoder(norm_first, activation):
    """Without autograd the layers share one q/k/v grid and add in place: the same numbers, padding still zero."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(D, 4, 48, 0.3, activation, batch_first=True, norm_first=norm_first)
    encoder = nn.TransformerEncoder(layer, 3, enable_nested_tensor=False).eval()
    x = torch.randn(4, 9, D)
    mask = torch.rand(4, 9) < 0.5
    mask[:, 0] = True
    with torch.inference_mode():
        expected = encoder(x, src_key_padding_mask=~mask)
        got = packed_encoder(encoder, x, mask)
    torch.testing.assert_close(got[mask], expected[mask], atol=1e-5, rtol=1e-5)
    assert not got[~mask].any()
    encoder.train()  # live dropout: the same draws from the same seed with and without autograd
    torch.manual_seed(1)
    with_grad = packed_encoder(encoder, x, mask)
    torch.manual_seed(1)
    with torch.no_grad():
        without = packed_encoder(encoder, x, mask)
    torch.testing.assert_close(without, with_grad.detach(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("training, dropout", [(False, 0.3), (True, 0.0), (True, 0.3)])
def test_folded_cross_attention_equals_multihead_attention(training, dropout):
    """Same outputs and gradients; under dropout the same draws from the same seed (the module's mask order)."""
    torch.manual_seed(0)
    attn = nn.MultiheadAttention(D, 4, dropout=dropout, batch_first=True).train(training)
    with torch.no_grad():
        attn.in_proj_bias.normal_()  # the key bias drops out, the value bias must not
    x = torch.randn(3, 6, D, requires_grad=True)
    memory = torch.randn(3, 11, D, requires_grad=True)
    pad = torch.rand(3, 11) < 0.4
    pad[:, 0] = False
    torch.manual_seed(1)
    expected = attn(x, memory, memory, key_padding_mask=pad, need_weights=False)[0]
    torch.manual_seed(1)
    got = folded_cross_attention(attn, x, memory, pad)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    weights = [x, memory] + list(attn.parameters())
    g_expected = torch.autograd.grad(expected.square().sum(), weights)
    g_got = torch.autograd.grad(got.square().sum(), weights)
    for a, b in zip(g_got, g_expected):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert not g_got[1][pad].any()  # padded memory receives no gradient


def test_folded_cross_attention_in_pieces_at_inference_gives_the_same_numbers(monkeypatch):
    import mamikit.fastpath as fastpath

    torch.manual_seed(0)
    attn = nn.MultiheadAttention(D, 4, dropout=0.3, batch_first=True).eval()
    x, memory = torch.randn(7, 5, D), torch.randn(7, 9, D)
    pad = torch.rand(7, 9) < 0.4
    pad[:, 0] = False
    whole = folded_cross_attention(attn, x, memory, pad)  # autograd on: one piece
    monkeypatch.setattr(fastpath, "CROSS_PIECE_NUMEL", 2 * 5 * 4 * D)  # two memes a piece
    calls = []
    real = torch.bmm

    def counting_bmm(a, b, **kw):
        if "out" not in kw:  # the scores and mixing per meme (the per-head products write in place)
            calls.append(a.shape[0])
        return real(a, b, **kw)

    monkeypatch.setattr(torch, "bmm", counting_bmm)
    with torch.no_grad():
        pieces = folded_cross_attention(attn, x, memory, pad)
    assert sorted(set(calls)) == [1, 2]  # 2 + 2 + 2 + 1 memes
    torch.testing.assert_close(pieces, whole, atol=1e-6, rtol=1e-6)


def test_folded_cross_attention_folds_queries_shared_by_the_batch_once(monkeypatch):
    import mamikit.fastpath as fastpath

    torch.manual_seed(0)
    attn = nn.MultiheadAttention(D, 4, batch_first=True)
    queries = torch.randn(5, D, requires_grad=True)
    x = queries.unsqueeze(0).expand(7, -1, -1)  # one set of queries for every meme (stride 0)
    memory = torch.randn(7, 9, D)
    pad = torch.rand(7, 9) < 0.4
    pad[:, 0] = False
    got = folded_cross_attention(attn, x, memory, pad)
    want = folded_cross_attention(attn, x.contiguous(), memory, pad)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got, attn(x, memory, memory, key_padding_mask=pad)[0], atol=1e-5, rtol=1e-5)
    grad = torch.autograd.grad(got.square().sum(), queries)[0]
    torch.testing.assert_close(grad, torch.autograd.grad(want.square().sum(), queries)[0], atol=1e-4, rtol=1e-4)
    monkeypatch.setattr(fastpath, "CROSS_PIECE_NUMEL", 2 * 5 * 4 * D)  # two memes a piece
    folds = []
    real = fastpath._fold
    monkeypatch.setattr(fastpath, "_fold", lambda q, w: folds.append(q.shape[0]) or real(q, w))
    with torch.no_grad():
        torch.testing.assert_close(folded_cross_attention(attn, x, memory, pad), want, atol=1e-5, rtol=1e-5)
    assert folds == [1]  # folded once for the 4 pieces


def test_head_matmul_equals_the_einsum_with_its_gradients():
    torch.manual_seed(0)
    x = torch.randn(7, 4, 5, requires_grad=True)
    w = torch.randn(4, 3, 5, requires_grad=True)
    for right in (w.transpose(1, 2), w.transpose(1, 2).contiguous()):  # a transposed view, as the value weights
        got, want = head_matmul(x, right), torch.einsum("nha,hab->nhb", x, right)
        assert got.shape == (7, 4, 3) and got.is_contiguous()
        torch.testing.assert_close(got, want)
        g = torch.randn_like(got)
        for a, b in zip(torch.autograd.grad(got, (x, w), g), torch.autograd.grad(want, (x, w), g)):
            torch.testing.assert_close(a, b)


def test_folded_cross_attention_scales_the_value_bias_by_the_kept_weights():
    """Under dropout the kept weights do not sum to one: the value bias must follow them, as in the module."""
    torch.manual_seed(0)
    attn = nn.MultiheadAttention(D, 4, dropout=0.5, batch_first=True)
    with torch.no_grad():
        attn.in_proj_bias.normal_(0.0, 3.0)
    x, memory = torch.randn(2, 6, D), torch.randn(2, 9, D)
    pad = torch.zeros(2, 9, dtype=torch.bool)
    exact = folded_cross_attention(attn.eval(), x, memory, pad)
    attn.train()
    with torch.no_grad():
        folded = torch.stack([folded_cross_attention(attn, x, memory, pad) for _ in range(400)])
        stock = torch.stack([attn(x, memory, memory, key_padding_mask=pad, need_weights=False)[0] for _ in range(400)])
    for draws in (folded, stock):
        torch.testing.assert_close(draws.mean(0), exact, atol=0.25, rtol=0)  # dropout is unbiased
    ratio = float(folded.std(0).mean() / stock.std(0).mean())
    assert 0.85 < ratio < 1.15, ratio


def test_packed_batch_under_bfloat16_autocast(store, text):
    """Mixed-precision plumbing (TrainConfig.amp uses float16 on CUDA; bfloat16 is what a CPU runs)."""
    root, n, _ = store
    data = _split(root, n)
    model = _model(text, dropout=0.0).train()
    batch = make_batch(data, [0, 1, 2, 3], pack=True, detr_all=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, loss = _loss(model, batch)
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    with torch.no_grad():
        exact, _ = _loss(model, batch)
    torch.testing.assert_close(out.logits["MAMI"].float(), exact.logits["MAMI"], atol=0.1, rtol=0)


# ------------------------------------------------------------------ one call per array, not one per meme


class _Counted(torch.Tensor):
    """A tensor that counts how often it is indexed."""

    gets = 0

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func is torch.Tensor.__getitem__:
            _Counted.gets += 1
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **(kwargs or {}))


def test_make_batch_slices_the_memory_mapped_store_without_a_loop_over_memes(tmp_path):
    n = 1000
    raw = _write_store(tmp_path, n, None, seed=3, dtype=np.float16)
    data = _split(tmp_path, n, seed=3)
    feats = data.features
    for name in ("clip", "detr", "detr_mask", "text_ids", "text_hidden", "text_offsets"):
        setattr(feats, name, getattr(feats, name).as_subclass(_Counted))
    counts = {}
    for size in (3, n):
        index = np.random.default_rng(size).permutation(n)[:size]
        _Counted.gets = 0
        batch = make_batch(data, index, pack=True, text_hidden=True, detr_all=True)
        counts[size] = _Counted.gets
        rows = data.rows[index]
        assert batch.detr_all.shape == (size, 100, DETR_DIM)
        assert torch.equal(batch.clip, torch.from_numpy(raw["clip"][rows]).float())
        assert torch.equal(batch.text_mask.sum(1), torch.from_numpy(np.diff(raw["offsets"])[rows]))
    # The same handful of slicing calls for 3 memes as for 1000: no Python loop over memes.
    assert counts[3] == counts[n] <= 8


# ------------------------------------------------------------------ algorithm 1


def _positions(order, name):
    return np.concatenate([idx for ds, idx in order if ds == name])


def test_epoch_batches_cover_every_sample_once_one_dataset_per_batch():
    sizes = {"MAMI": 103, "FBHM": 37, "EMPTY": 0}
    order = epoch_batches(sizes, 16, np.random.default_rng(0))
    assert {ds for ds, _ in order} == {"MAMI", "FBHM"}
    for name in ("MAMI", "FBHM"):
        assert sorted(_positions(order, name).tolist()) == list(range(sizes[name]))
        lens = [len(idx) for ds, idx in order if ds == name]
        assert len(lens) == -(-sizes[name] // 16) and all(n == 16 for n in lens[:-1])
    assert all(idx.max() < sizes[ds] for ds, idx in order)


def test_epoch_batches_are_fixed_by_the_seed():
    sizes = {"MAMI": 80, "FBHM": 48}
    a, b = (epoch_batches(sizes, 8, np.random.default_rng(7)) for _ in range(2))
    assert [ds for ds, _ in a] == [ds for ds, _ in b]
    assert all(np.array_equal(x, y) for (_, x), (_, y) in zip(a, b))
    c = epoch_batches(sizes, 8, np.random.default_rng(8))
    assert ([ds for ds, _ in a] != [ds for ds, _ in c]
            or not np.array_equal(_positions(a, "MAMI"), _positions(c, "MAMI")))


def test_epoch_batches_interleave_the_datasets():
    sizes = {"MAMI": 160, "FBHM": 160}
    firsts, switches = [], []
    for seed in range(200):
        names = [ds for ds, _ in epoch_batches(sizes, 16, np.random.default_rng(seed))]
        firsts.append(names[0])
        switches.append(sum(a != b for a, b in zip(names, names[1:])))
    # The next dataset is drawn among those with batches left: either comes first about half the time,
    # and an epoch switches datasets many times rather than running one dataset after the other.
    assert 70 < firsts.count("MAMI") < 130
    assert np.mean(switches) > 7 and np.mean(np.array(switches) >= 3) > 0.9
