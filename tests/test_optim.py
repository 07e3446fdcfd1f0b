"""Tests of mamikit.optim: the multi-tensor MADGRAD against the madgrad package, its oracle (section 4)."""

from __future__ import annotations

import copy
import io
import itertools
import warnings

import madgrad
import pytest
import torch

from mamikit import optim
from mamikit.optim import FUSED_MIN_NUMEL, MADGRAD, clip_coefficient, cube_root, fused_kernel, tiles
from mamikit.utils import MamikitError

SHAPES = [(7, 5), (13,), (3, 4, 6), (), (60, 17), (2, 1, 9)]


def _params(dtype=torch.float32, seed=0) -> list[torch.Tensor]:
    """Leaf tensors of several shapes, one of them not contiguous (a transposed matrix)."""
    g = torch.Generator().manual_seed(seed)
    ps = [torch.randn(s, generator=g, dtype=dtype).requires_grad_() for s in SHAPES]
    ps.append(torch.randn(11, 6, generator=g, dtype=dtype).t().requires_grad_())  # (6, 11), strides (1, 6)
    return ps


def _groups(ps, decay=1e-2) -> list[dict]:
    """Two groups as `mamikit.model.param_groups` makes them: decayed weights, plain biases."""
    return [{"params": ps[::2], "weight_decay": decay}, {"params": ps[1::2], "weight_decay": 0.0}]


def _grads(ps, step: int, seed=1) -> list[torch.Tensor]:
    """Seeded random gradients for one step, some entries exactly zero."""
    g = torch.Generator().manual_seed(seed * 100_003 + step)
    out = []
    for p in ps:
        grad = torch.randn(p.shape, generator=g).to(p.dtype)
        out.append(grad * (torch.rand(p.shape, generator=g) > 0.1))
    return out


def _run(opt, ps, steps, start=0, scheduler=None):
    """`steps` optimiser steps on fresh copies of the seeded gradients (the package adds its decay into them)."""
    for k in range(start, start + steps):
        for p, grad in zip(ps, _grads(ps, k)):
            p.grad = grad.to(p.device)  # fresh tensors: the package adds its decay into them
        opt.step()
        if scheduler is not None:
            scheduler.step()


def _max_rel_diff(a, b) -> float:
    """Largest |a - b| over the largest |b|, the worst tensor."""
    return max(((x - y).abs().max() / y.abs().max().clamp(min=1e-30)).item() for x, y in zip(a, b))


@pytest.mark.parametrize("momentum,decouple", list(itertools.product([0.9, 0.0], [False, True])))
def test_equals_package_in_float64(momentum, decouple):
    """The same algorithm to float64 rounding: 100 steps, two groups, small tiles, two workers."""
    a, b = _params(torch.float64), _params(torch.float64)
    ref = madgrad.MADGRAD(_groups(a), lr=1e-2, momentum=momentum, decouple_decay=decouple)
    ours = MADGRAD(_groups(b), lr=1e-2, momentum=momentum, decouple_decay=decouple, tile_numel=100, workers=2)
    _run(ref, a, 100)
    _run(ours, b, 100)
    assert _max_rel_diff(b, a) < 1e-12
    assert _max_rel_diff([p.detach() for p in b], [p.detach() for p in _params(torch.float64)]) > 1e-3  # it moved


@pytest.mark.parametrize("momentum,decouple", list(itertools.product([0.9, 0.0], [False, True])))
def test_equals_package_in_float32(momentum, decouple):
    """float32: equal to 1e-6 relative after 100 steps (the cube root is the only different rounding)."""
    a, b = _params(), _params()
    ref = madgrad.MADGRAD(_groups(a), lr=1e-2, momentum=momentum, decouple_decay=decouple)
    ours = MADGRAD(_groups(b), lr=1e-2, momentum=momentum, decouple_decay=decouple, tile_numel=200)
    _run(ref, a, 100)
    _run(ours, b, 100)
    assert _max_rel_diff(b, a) < 1e-6


def test_paper_settings_match_package():
    """Section 4's lr 2e-4 and weight decay 5e-4, default momentum, default tiles and workers."""
    a, b = _params(), _params()
    ref = madgrad.MADGRAD(_groups(a, 5e-4), lr=2e-4)
    ours = MADGRAD(_groups(b, 5e-4), lr=2e-4)
    _run(ref, a, 100)
    _run(ours, b, 100)
    assert _max_rel_diff(b, a) < 1e-6


def test_tiles_and_workers_do_not_change_the_result():
    """Every tiling and thread count gives the same parameters (the float operations are elementwise)."""
    results = []
    for tile, workers in [(None, 1), (7, 1), (60, 3), (10**9, 2)]:
        ps = _params()
        _run(MADGRAD(_groups(ps), tile_numel=tile, workers=workers), ps, 5)
        results.append(ps)
    for ps in results[1:]:
        assert _max_rel_diff(ps, results[0]) < 1e-6


def test_state_dict_round_trip_continues_identically():
    """Save after 50 steps, load into a fresh optimiser over copied parameters, 50 more = 100 straight."""
    straight = _params()
    opt = MADGRAD(_groups(straight))
    _run(opt, straight, 100)

    first = _params()
    opt = MADGRAD(_groups(first))
    _run(opt, first, 50)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    resumed = [p.detach().clone().requires_grad_() for p in first]
    fresh = MADGRAD(_groups(resumed, decay=0.5), lr=1.0)  # hyper-parameters come from the state dict
    fresh.load_state_dict(torch.load(io.BytesIO(buf.getvalue()), weights_only=True))
    _run(fresh, resumed, 50, start=50)
    assert all(torch.equal(x, y) for x, y in zip(resumed, straight))
    assert int(fresh.state["k"]) == 100


def test_state_dict_layout_is_the_packages():
    """Same group keys and per-parameter slots, the shared step counter under "k"."""
    a, b = _params(), _params()
    ref, ours = madgrad.MADGRAD(_groups(a)), MADGRAD(_groups(b))
    _run(ref, a, 2)
    _run(ours, b, 2)
    sa, sb = ref.state_dict(), ours.state_dict()
    assert [sorted(g) for g in sa["param_groups"]] == [sorted(g) for g in sb["param_groups"]]
    assert sa["param_groups"] == sb["param_groups"]
    assert sa["state"].keys() == sb["state"].keys()
    assert torch.equal(sa["state"]["k"], sb["state"]["k"])
    for key in sa["state"]:
        if key != "k":
            assert sa["state"][key].keys() == sb["state"][key].keys() == {"grad_sum_sq", "s", "x0"}
            assert all(sa["state"][key][s].dtype == sb["state"][key][s].dtype for s in ("grad_sum_sq", "s", "x0"))


@pytest.mark.parametrize("momentum", [0.9, 0.0])
def test_checkpoints_move_between_package_and_ours(momentum):
    """A package state dict resumes in ours, and ours in the package, as if nothing had changed."""
    for first_cls, second_cls in [(madgrad.MADGRAD, MADGRAD), (MADGRAD, madgrad.MADGRAD)]:
        straight = _params()
        _run(second_cls(_groups(straight), momentum=momentum), straight, 100)
        ps = _params()
        opt = first_cls(_groups(ps), momentum=momentum)
        _run(opt, ps, 50)
        state = copy.deepcopy(opt.state_dict())
        resumed = [p.detach().clone().requires_grad_() for p in ps]
        other = second_cls(_groups(resumed), momentum=momentum)
        other.load_state_dict(state)
        _run(other, resumed, 50, start=50)
        assert _max_rel_diff(resumed, straight) < 1e-6, (first_cls, second_cls)


@pytest.mark.parametrize("saver", [MADGRAD, madgrad.MADGRAD])
def test_checkpoint_of_mamikit_saves_and_loads_our_state(tmp_path, saver):
    """`save_checkpoint` / `load_checkpoint` (safetensors, no pickle) carry our optimiser state.

    A run written while training used the madgrad package (its state saved by that) resumes in ours.
    """
    from transformers import BertConfig, BertModel

    from mamikit.checkpoints import load_checkpoint, save_checkpoint
    from mamikit.data import load_tasks
    from mamikit.model import MamiModel, param_groups
    from model_configs import model_config

    def model():
        torch.manual_seed(0)
        text = BertModel(BertConfig(vocab_size=120, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                    intermediate_size=32, max_position_embeddings=128)).eval()
        cfg = model_config(tuple(load_tasks()["MAMI"]), 8, 8, encoder_layers=1,
                          decoder_layers=1, num_heads=2, mlp_hidden=8, ffn_dim=16)
        return MamiModel(cfg, text)

    def steps(m, opt, start, n):
        trainable = [p for p in m.parameters() if p.requires_grad]
        _run(opt, trainable, n, start)

    straight = model()
    steps(straight, MADGRAD(param_groups(straight, 5e-4), lr=2e-4), 0, 6)
    m = model()
    opt = saver(param_groups(m, 5e-4), lr=2e-4)
    steps(m, opt, 0, 3)
    state = {"epoch": 0, "batch_in_epoch": 3, "step": 3, "evals": 0, "best": {}, "complete": False,
             "scheduler_last_epoch": 3}
    save_checkpoint(tmp_path / "last", m, state, opt)
    resumed = model()
    opt2 = MADGRAD(param_groups(resumed, 5e-4), lr=2e-4)
    load_checkpoint(tmp_path / "last", resumed, opt2)
    for p in resumed.parameters():
        p.grad = None  # checkpoints also restore pending gradients; these steps set their own
    steps(resumed, opt2, 3, 3)
    for (name, x), y in zip(resumed.named_parameters(), straight.parameters()):
        if saver is MADGRAD:
            assert torch.equal(x, y), name
        else:  # the package's first steps differ from ours by the cube root's rounding
            torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7, msg=name)


def test_lr_schedule_is_honoured():
    """A warm-up schedule changing lr every step: same parameters as the package under the same schedule."""
    from transformers import get_linear_schedule_with_warmup

    a, b = _params(), _params()
    ref, ours = madgrad.MADGRAD(_groups(a), lr=1e-2), MADGRAD(_groups(b), lr=1e-2)
    sched_a = get_linear_schedule_with_warmup(ref, 10, 60)
    sched_b = get_linear_schedule_with_warmup(ours, 10, 60)
    _run(ref, a, 40, scheduler=sched_a)
    _run(ours, b, 40, scheduler=sched_b)
    assert _max_rel_diff(b, a) < 1e-6
    constant = _params()
    _run(MADGRAD(_groups(constant), lr=1e-2), constant, 40)
    assert _max_rel_diff(b, constant) > 1e-4  # the schedule made a difference


def test_closure_and_parameters_without_gradients():
    """The closure's loss is returned and its gradients used; a parameter without a gradient is left alone."""
    a, b = _params(), _params()
    frozen = torch.randn(4, requires_grad=True)
    before = frozen.detach().clone()
    target = [torch.randn(p.shape) for p in a]
    ref = madgrad.MADGRAD(_groups(a))
    ours = MADGRAD(_groups(b) + [{"params": [frozen]}])

    def closure_for(opt, ps):
        def closure():
            opt.zero_grad()
            loss = sum(((p - t) ** 2).sum() for p, t in zip(ps, target))
            loss.backward()
            return loss
        return closure

    for _ in range(5):
        loss_a = ref.step(closure_for(ref, a))
        loss_b = ours.step(closure_for(ours, b))
        assert loss_b.item() == pytest.approx(loss_a.item(), rel=1e-5)
    assert _max_rel_diff(b, a) < 1e-6
    assert torch.equal(frozen, before) and frozen not in ours.state
    assert int(ours.state["k"]) == 5


def test_gradients_are_left_untouched():
    """Unlike the package, the weight decay is not added into p.grad."""
    ps = _params()
    grads = _grads(ps, 0)
    for p, grad in zip(ps, grads):
        p.grad = grad.clone()
    MADGRAD(_groups(ps, 0.3)).step()
    assert all(torch.equal(p.grad, grad) for p, grad in zip(ps, grads))


def test_eps_zero_gives_zero_steps_where_nothing_was_seen():
    """eps = 0 with zero gradient entries: as the package with momentum, and no NaN without it."""
    a, b = _params(), _params()
    ref, ours = madgrad.MADGRAD(_groups(a), eps=0.0), MADGRAD(_groups(b), eps=0.0)
    _run(ref, a, 10)
    _run(ours, b, 10)
    assert _max_rel_diff(b, a) < 1e-6
    c = _params()
    _run(MADGRAD(_groups(c), momentum=0.0, eps=0.0), c, 10)
    assert all(torch.isfinite(p).all() for p in c)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_parameters_step_through_float32(dtype):
    """bfloat16 / float16 parameters: float32 state, the same values as the package."""
    a, b = _params(dtype), _params(dtype)
    ref, ours = madgrad.MADGRAD(_groups(a)), MADGRAD(_groups(b))
    _run(ref, a, 10)
    _run(ours, b, 10)
    assert all(p.dtype == dtype for p in b)
    assert all(st["s"].dtype == torch.float32 for key, st in ours.state.items() if key != "k")
    eps = torch.finfo(dtype).eps
    assert all(torch.allclose(x.float(), y.float(), rtol=2 * eps, atol=eps) for x, y in zip(b, a))



def _tied(seed=0) -> list[torch.Tensor]:
    """Parameters over shared storage, as the authors' tied embeddings (docs/fidelity.md row 18), plus a free one.

    Two parameters over one (5, 4) table, two views of one row of a (2, 4)
    table, and an independent (3,) tensor, as ``nn.Parameter(t.detach())``.
    """
    g = torch.Generator().manual_seed(seed)
    table, types = torch.randn(5, 4, generator=g), torch.randn(2, 4, generator=g)
    free = torch.randn(3, generator=g)
    return [torch.nn.Parameter(table.detach()), torch.nn.Parameter(types.detach()[0]),
            torch.nn.Parameter(table.detach()), torch.nn.Parameter(types.detach()[0]), torch.nn.Parameter(free)]


@pytest.mark.parametrize("momentum", [0.9, 0.0])
def test_parameters_sharing_storage_step_as_the_package(momentum):
    """Each parameter over a shared tensor moves what the earlier ones left, as the package's per-parameter loop."""
    a, b = _tied(), _tied()
    assert a[0].data_ptr() == a[2].data_ptr() and a[1].data_ptr() == a[3].data_ptr()
    ref = madgrad.MADGRAD(_groups(a, 5e-2), lr=1e-2, momentum=momentum)
    ours = MADGRAD(_groups(b, 5e-2), lr=1e-2, momentum=momentum, workers=2, tile_numel=8)
    _run(ref, a, 20)
    _run(ours, b, 20)
    assert _max_rel_diff(b, a) < 1e-5
    assert b[0].data_ptr() == b[2].data_ptr()  # still one tensor
    # One multi-tensor phase over both aliases would scale the shared table twice per step.
    assert _max_rel_diff(b, _tied()) > 1e-3


def test_authors_recipe_model_with_tied_embeddings_steps_as_the_package():
    """The `authors` recipe's image encoders over BERT's embedding tensors (on the CPU): the package's parameters."""
    from transformers import BertConfig, BertModel

    from mamikit.data import load_tasks
    from mamikit.model import MamiModel, param_groups
    from model_configs import model_config

    def model():
        torch.manual_seed(0)
        text = BertModel(BertConfig(vocab_size=120, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                    intermediate_size=32, max_position_embeddings=128)).eval()
        cfg = model_config(tuple(load_tasks()["MAMI"]), 8, 8, encoder_layers=1,
                          decoder_layers=1, num_heads=2, mlp_hidden=8, ffn_dim=16, tied_text_embeddings=True,
                          segments_as_coded=True)
        return MamiModel(cfg, text)

    ref, ours = model(), model()
    assert ours.shares_text_embeddings()
    _run(madgrad.MADGRAD(param_groups(ref, 5e-4, by_name=True), lr=1e-2),
         [p for p in ref.parameters() if p.requires_grad], 5)
    _run(MADGRAD(param_groups(ours, 5e-4, by_name=True), lr=1e-2),
         [p for p in ours.parameters() if p.requires_grad], 5)
    assert ours.shares_text_embeddings()
    for (name, x), y in zip(ours.state_dict().items(), ref.state_dict().values()):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6, msg=name)

def test_sparse_gradients_are_refused():
    emb = torch.nn.Embedding(10, 3, sparse=True)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(MamikitError, match="sparse gradient"):
        MADGRAD(emb.parameters()).step()


def test_bad_hyper_parameters_are_refused():
    p = [torch.zeros(2, requires_grad=True)]
    for kw in ({"momentum": 1.0}, {"lr": -1.0}, {"weight_decay": -1.0}, {"eps": -1.0}, {"workers": 0}):
        with pytest.raises(ValueError, match="MADGRAD"):
            MADGRAD(p, **kw)


def test_momentum_switched_on_mid_run_is_refused():
    ps = _params()
    opt = MADGRAD(_groups(ps), momentum=0.0)
    _run(opt, ps, 1)
    for g in opt.param_groups:
        g["momentum"] = 0.9
    with pytest.raises(MamikitError, match="no x0"):
        _run(opt, ps, 1)


def test_deepcopy_keeps_stepping():
    ps = _params()
    opt = MADGRAD(_groups(ps), tile_numel=16, workers=2)
    _run(opt, ps, 2)
    twin = copy.deepcopy(opt)
    assert (twin.tile_numel, twin.workers) == (16, 2)
    _run(twin, [p for g in twin.param_groups for p in g["params"]], 1)


def test_cube_root_agrees_with_pow():
    x = torch.cat([torch.zeros(3), torch.logspace(-30, 10, 2001)])
    got, = cube_root([x])
    assert got[:3].eq(0).all()
    torch.testing.assert_close(got, x.double().pow(1 / 3).float(), rtol=3e-6, atol=0)
    torch.testing.assert_close(cube_root([x.double()])[0], x.double().pow(1 / 3), rtol=1e-14, atol=0)


def test_tiles_cover_every_element_once_as_views():
    ts = [torch.zeros(s) for s in [(5, 7), (3,), (0,), (40,), (9,), (6,)]] + [torch.zeros(4, 6).t()]
    us = [torch.zeros_like(t) for t in ts]
    sizes, whole = [], []
    for pieces, others in tiles([ts, us], 16):
        assert [p.shape for p in pieces] == [o.shape for o in others]
        torch._foreach_add_(pieces, 1.0)
        sizes.append(sum(p.numel() for p in pieces))
        whole += [p for p in pieces if any(p is t for t in ts)]
    assert all(t.eq(1).all() for t in ts)  # each element once, written through the views
    assert sum(sizes) == sum(t.numel() for t in ts)
    # 35 = 16 + 16 + 3, the 3 joined by the (3,); 40 = 16 + 16 + 8; the (9,) starts a tile of its own (8 + 9 > 16),
    # the (6,) joins it; the non-contiguous one goes whole into the last
    assert sizes == [16, 16, 6, 16, 16, 8, 15, 24]
    # tensors that fit in a tile go in as themselves: no view or slice of them per step
    assert [tuple(t.shape) for t in whole] == [(3,), (9,), (6,), (6, 4)]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    a = _params()
    b = [p.detach().cuda().requires_grad_() for p in _params()]
    _run(MADGRAD(_groups(a)), a, 20)
    _run(MADGRAD(_groups(b)), b, 20)
    assert all(p.is_cuda for p in b)
    assert _max_rel_diff([p.cpu() for p in b], a) < 1e-5


@pytest.mark.parametrize("momentum", [0.9, 0.0])
def test_clipping_folded_into_the_step_equals_clip_then_step(momentum):
    """step(grad_scale=clip_coefficient(...)) is clip_grad_norm_ then step(), over 30 clipped steps; p.grad stays."""
    a, b = _params(), _params()
    folded = MADGRAD(_groups(a), lr=1e-2, momentum=momentum, tile_numel=16, workers=2)
    plain = MADGRAD(_groups(b), lr=1e-2, momentum=momentum, tile_numel=16, workers=2)
    factors = []
    for k in range(30):
        for pa, pb, grad in zip(a, b, _grads(a, k)):
            pa.grad, pb.grad = grad.clone(), grad.clone()
        coef = clip_coefficient(a, 0.5)
        factors.append(float(coef))
        folded.step(grad_scale=coef)
        assert all(torch.equal(p.grad, g) for p, g in zip(a, _grads(a, k)))  # unscaled, untouched
        total = torch.nn.utils.clip_grad_norm_(b, 0.5)
        assert float(coef) == pytest.approx(min(1.0, 0.5 / (float(total) + 1e-6)), rel=1e-6)
        plain.step()
    assert max(factors) < 0.2  # the seeded gradients' norms are well above 0.5: clipping engaged every step
    assert _max_rel_diff(a, b) < 1e-6


# ------------------------------------------------------------------ the compiled one-pass update


def _large_params(seed=0) -> list[torch.Tensor]:
    """Two tensors the compiled update takes (contiguous, >= FUSED_MIN_NUMEL), a large transposed one
    and small ones."""
    g = torch.Generator().manual_seed(seed)
    ps = [torch.randn(s, generator=g).requires_grad_() for s in [(300, 260), (5, 7), (FUSED_MIN_NUMEL + 17,), (9,)]]
    ps.append(torch.randn(260, 300, generator=g).t().requires_grad_())  # large but not contiguous: tiled
    return ps


def _compiler() -> bool:
    import shutil

    return any(shutil.which(cc) for cc in ("c++", "g++", "clang++"))


@pytest.mark.skipif(not _compiler(), reason="torch.compile needs a C++ compiler on the CPU")
def test_compiled_update_equals_the_package_over_100_clipped_steps():
    a, b, c = _large_params(), _large_params(), _large_params()
    ref = madgrad.MADGRAD(_groups(a, 5e-4), lr=2e-4)
    fused = MADGRAD(_groups(b, 5e-4), lr=2e-4, fused=True)
    tiled = MADGRAD(_groups(c, 5e-4), lr=2e-4, fused=False)
    assert fused_kernel() is not None
    for k in range(100):
        grads = _grads(a, k)
        for ps in (a, b, c):
            for p, grad in zip(ps, grads):
                p.grad = grad.clone()
        coef = clip_coefficient(b, 50.0)  # engaged on some steps
        torch.nn.utils.clip_grad_norm_(a, 50.0)
        ref.step()
        fused.step(grad_scale=coef)
        tiled.step(grad_scale=coef)
    assert fused.fused_numel == 300 * 260 + FUSED_MIN_NUMEL + 17 and tiled.fused_numel == 0
    assert _max_rel_diff(b, a) < 1e-6
    assert _max_rel_diff(b, c) < 1e-6
    assert _max_rel_diff([p.detach() for p in b], [p.detach() for p in _large_params()]) > 1e-4  # it moved


def test_compiled_update_is_left_to_large_groups_by_default():
    ps = _large_params()
    opt = MADGRAD(_groups(ps), lr=1e-2)  # fused=None: these groups are far below FUSED_MIN_GROUP_NUMEL
    _run(opt, ps, 2)
    assert opt.fused_numel == 0
    half = MADGRAD(_groups(_params()), momentum=0.0, fused=True)  # momentum 0: the tiled form
    _run(half, half.param_groups[0]["params"] + half.param_groups[1]["params"], 1)
    assert half.fused_numel == 0


def test_without_a_compiler_the_tiled_update_runs_with_one_warning(monkeypatch):
    def no_compiler(fn, **kwargs):
        def fails(*args, **kw):
            raise RuntimeError("InvalidCxxCompiler: no working C++ compiler found")
        return fails

    monkeypatch.setattr(optim, "_FUSED", {})
    monkeypatch.setattr(torch, "compile", no_compiler)
    a, b = _large_params(), _large_params()
    ref = madgrad.MADGRAD(_groups(a, 5e-4), lr=2e-4)
    ours = MADGRAD(_groups(b, 5e-4), lr=2e-4, fused=True)
    with pytest.warns(RuntimeWarning, match="compiled one-pass update is unavailable.*InvalidCxxCompiler"):
        _run(ours, b, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning
        _run(ours, b, 9, start=1)
    _run(ref, a, 10)
    assert ours.fused_numel == 0
    assert _max_rel_diff(b, a) < 1e-6


@pytest.mark.skipif(not _compiler(), reason="torch.compile needs a C++ compiler on the CPU")
def test_compiled_update_with_eps_zero_leaves_never_seen_entries_still():
    """eps = 0 and entries whose gradient was always 0: a zero step there (no 0/0), as the package
    and the tiled step."""
    a, b, c = _large_params(), _large_params(), _large_params()
    ref = madgrad.MADGRAD(_groups(a, 0.0), lr=2e-4, eps=0.0)
    fused = MADGRAD(_groups(b, 0.0), lr=2e-4, eps=0.0, fused=True)
    tiled = MADGRAD(_groups(c, 0.0), lr=2e-4, eps=0.0, fused=False)
    for k in range(5):
        grads = _grads(a, k)
        for grad in grads:
            grad.view(-1)[: grad.numel() // 3] = 0  # the first third never gets a gradient
        for ps in (a, b, c):
            for p, grad in zip(ps, grads):
                p.grad = grad.clone()
        for opt in (ref, fused, tiled):
            opt.step()
    assert fused.fused_numel == 300 * 260 + FUSED_MIN_NUMEL + 17
    assert all(torch.isfinite(p).all() for p in b)
    start = _large_params()
    for p, p0 in zip(b, start):
        still = p.detach().reshape(-1)[: p.numel() // 3]
        assert torch.equal(still, p0.detach().reshape(-1)[: p.numel() // 3])
    assert _max_rel_diff(b, a) < 1e-6
    assert _max_rel_diff(b, c) < 1e-6
