"""MADGRAD, the optimiser of section 4, as a multi-tensor step over whole parameter groups.

Section 4 trains with MADGRAD (Defazio and Jelassi, 2021), learning rate
2e-4, weight decay 5e-4 on every parameter except biases and LayerNorm
weights (`mamikit.model.param_groups`). :class:`MADGRAD` here takes the same
hyper-parameters, defaults, state and ``state_dict`` layout as the
``madgrad`` package's ``madgrad.MADGRAD``, so either can resume the other's
checkpoints; only the way a step is computed differs (see the class).
"""

from __future__ import annotations

import math
import threading
from collections import defaultdict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import torch

from .utils import MamikitError

LOW_PRECISION = (torch.float16, torch.bfloat16)  # updated through float32 copies, state kept in float32
# Elements per tile on the CPU: a tile's arrays (parameter, gradient, three
# state slots, three temporaries) stay in the cache across the phases of a step.
CPU_TILE_NUMEL = 1 << 18
# Elsewhere (CUDA) a tile only bounds the temporaries (three of 64 MB); each phase is one fused launch per tile.
DEVICE_TILE_NUMEL = 1 << 24
# On the CPU, a float32 group of at least FUSED_MIN_GROUP_NUMEL elements steps its tensors of at least
# FUSED_MIN_NUMEL elements with the compiled one-pass update (`fused_update`); the compile (seconds, once
# per process) pays for itself at the paper's sizes (116M parameters), not at the demo's (a few million).
FUSED_MIN_GROUP_NUMEL = 1 << 24
FUSED_MIN_NUMEL = 1 << 16


def cube_root(xs: list[torch.Tensor]) -> list[torch.Tensor]:
    """Cube roots of non-negative tensors, as exp(log(x) / 3); cbrt(0) = 0.

    ``torch.pow(x, 1/3)`` is about ten times slower on the CPU (a general scalar
    exponent is not vectorised; log and exp are). In float32 the two differ
    by a few 1e-7 relative (up to 3e-6 for x far from 1), the order by which
    ``pow`` itself misses the cube root: its exponent 1/3 is rounded to float32.
    """
    roots = torch._foreach_log(xs)
    torch._foreach_mul_(roots, 1.0 / 3.0)
    torch._foreach_exp_(roots)
    return roots


def tiles(lists: list[list[torch.Tensor]], tile_numel: int) -> Iterator[list[list[torch.Tensor]]]:
    """Cut parallel lists of same-shaped tensors into tiles of at most `tile_numel` elements.

    Yields one list of pieces per input list. A tensor that fits in a tile
    goes into it whole, itself and not a view (the next tile starts where it
    would not fit in what is left of this one): a step's bookkeeping is then a
    few operators per tile, not a view and a slice per tensor and list, which
    on a GPU each cost a dispatch. A contiguous tensor larger than a tile is
    cut into flat slices (views) of `tile_numel` elements, its remainder
    starting the next tile; a larger one that is not contiguous in every list
    goes whole into a tile of its own. Every element lands in one tile once;
    the update is elementwise, so how tensors are grouped never changes it.
    """
    tile, n = [[] for _ in lists], 0
    for tensors in zip(*lists):
        size = tensors[0].numel()
        if not size:
            continue
        if n and n + size > tile_numel:
            yield tile
            tile, n = [[] for _ in lists], 0
        if size > tile_numel and all(t.is_contiguous() for t in tensors):
            flat = [t.view(-1) for t in tensors]
            whole = size - size % tile_numel
            for a in range(0, whole, tile_numel):
                yield [[f[a:a + tile_numel]] for f in flat]
            if whole < size:
                tile, n = [[f[whole:]] for f in flat], size - whole
            continue
        for pieces, t in zip(tile, tensors):
            pieces.append(t)
        n += size
        if n >= tile_numel:
            yield tile
            tile, n = [[] for _ in lists], 0
    if n:
        yield tile


class MADGRAD(torch.optim.Optimizer):
    """MADGRAD (Defazio and Jelassi, 2021), each phase of a step one multi-tensor operation over many parameters.

    A drop-in for ``madgrad.MADGRAD``: the same arguments, defaults, update
    and state. With k the step counter shared by all groups (``state["k"]``),
    lr' = lr + eps (when lr != 0), lambda_k = lr' sqrt(k + 1), c = 1 - momentum
    and g_k the gradient (plus weight_decay * x_k unless decouple_decay):

        nu_{k+1} = nu_k + lambda_k g_k^2              (state "grad_sum_sq")
        s_{k+1}  = s_k + lambda_k g_k                 (state "s")
        z_{k+1}  = x_0 - s_{k+1} / (nu_{k+1}^(1/3) + eps)
        x_{k+1}  = (1 - c) x_k + c z_{k+1}

    a dual-averaged step whose denominator is the cube root (not Adam's square
    root) of the weighted sum of squared gradients, then momentum as an average
    of the iterates. x_0 is the starting point, kept as state "x0" when
    momentum != 0 and otherwise recomputed as x_k + s_k / (nu_k^(1/3) + eps).
    With decouple_decay, x_{k+1} also loses lr' * weight_decay * x_k.

    Why a different step: ``madgrad.MADGRAD`` runs eight to ten tensor
    operations per parameter in a Python loop and allocates two temporaries
    of the parameter's size each time; every operation streams the whole
    tensor through memory, and on the CPU each one is also a synchronisation
    of all threads. Here the parameters of a group with the same device and
    dtype are cut into tiles (`tiles`, ``tile_numel`` elements) and each phase
    of the step is one ``torch._foreach_*`` call over a tile's pieces (one
    fused launch on CUDA), its temporaries tile-sized. On the CPU a tile's
    arrays stay in the cache from phase to phase, and ``workers`` threads
    take tiles from a shared queue (PyTorch releases the GIL inside its
    operations), so the cores work on different tiles with no barrier between
    the phases. The cube root is taken with `cube_root`. The float operations
    are the package's, in its order: results differ from it by the cube
    root's rounding. Even in the cache, those ten passes bound the step on
    the CPU; at the paper's sizes the large float32 tensors go instead
    through one compiled loop per tensor (`fused_update`, ``fused``) that
    reads and writes each array once. Parameters that share storage (the
    `authors` recipe's tied embeddings while they last) are stepped one at a
    time in group order, as the package's loop does, each on what the earlier
    ones left.

    Departures from the package: ``p.grad`` is left untouched (the package
    adds the weight decay into it); sparse gradients raise a MamikitError
    (use ``madgrad.MADGRAD`` for them); with eps = 0, a zero denominator
    makes a zero step in the momentum-free form too (the package gives NaN on
    the first step there).

    Args:
        params: parameters or parameter groups (dicts), as for any torch optimiser.
        lr: learning rate.
        momentum: in [0, 1).
        weight_decay: L2 penalty added to the gradient (or decoupled).
        eps: added to the cube-root denominator.
        decouple_decay: apply the weight decay to the parameters directly (AdamW style).
        tile_numel: elements per tile; default 2^18 on the CPU, 2^24 elsewhere.
        workers: threads for the CPU tiles; default ``torch.get_num_threads()``.
        fused: step large float32 CPU tensors with the compiled one-pass update
            (`fused_update`): None (default) where the group is large enough
            (`FUSED_MIN_GROUP_NUMEL`), True for every group, False never. Where
            ``torch.compile`` cannot build it (no C++ compiler), the tiled step
            runs instead, with one warning.
    """

    # Execution settings, not hyper-parameters: outside the state dict (class defaults survive unpickling).
    tile_numel: int | None = None
    workers: int | None = None
    fused: bool | None = None
    fused_numel: int = 0  # elements the last step updated through the compiled kernel

    def __init__(self, params, lr: float = 1e-2, momentum: float = 0.9, weight_decay: float = 0,
                 eps: float = 1e-6, decouple_decay: bool = False, *, tile_numel: int | None = None,
                 workers: int | None = None, fused: bool | None = None):
        if not 0 <= momentum < 1:
            raise ValueError(f"MADGRAD: momentum {momentum} must be in [0, 1)")
        if lr < 0:
            raise ValueError(f"MADGRAD: learning rate {lr} must be non-negative")
        if weight_decay < 0:
            raise ValueError(f"MADGRAD: weight decay {weight_decay} must be non-negative")
        if eps < 0:
            raise ValueError(f"MADGRAD: eps {eps} must be non-negative")
        for name, value in (("tile_numel", tile_numel), ("workers", workers)):
            if value is not None and value < 1:
                raise ValueError(f"MADGRAD: {name} {value} must be positive")
        # The group keys of madgrad.MADGRAD, so that state dicts move between the two.
        defaults = dict(lr=lr, eps=eps, momentum=momentum, weight_decay=weight_decay, decouple_decay=decouple_decay)
        super().__init__(params, defaults)
        self.tile_numel = tile_numel
        self.workers = workers
        self.fused = fused

    def __getstate__(self):
        return dict(super().__getstate__(), tile_numel=self.tile_numel, workers=self.workers, fused=self.fused)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None, *, grad_scale: torch.Tensor | float | None = None
             ) -> float | None:
        """One MADGRAD step for every parameter with a gradient; returns the closure's loss if given.

        `grad_scale` multiplies every gradient before it is used (``p.grad`` stays
        as it is): gradient clipping folded into the step (`clip_coefficient`),
        so the gradients are scaled tile by tile in the cache instead of in a
        pass of their own. The same numbers as ``clip_grad_norm_`` then ``step()``.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # One counter for all groups, a tensor under the key "k" as in madgrad.MADGRAD.
        if "k" not in self.state:
            self.state["k"] = torch.tensor([0], dtype=torch.long)
        k = int(self.state["k"].item())
        shared = _shared_storage(self.param_groups)
        cpu_work, device_work, write_back, fused = [], [], [], []
        for g, group in enumerate(self.param_groups):
            for (device, dtype), params in self._buckets(g, group, skip=shared).items():
                if self._fuses(group, device, dtype, params):
                    large = [p.numel() >= FUSED_MIN_NUMEL and p.is_contiguous() for p in params]
                    fused.append((group, [p for p, big in zip(params, large) if big]))
                    params = [p for p, big in zip(params, large) if not big]
                    if not params:
                        continue
                lists, back = self._lists(params, group)
                if back:
                    write_back.append(back)
                cpu = device.type == "cpu"
                tile_numel = self.tile_numel or (CPU_TILE_NUMEL if cpu else DEVICE_TILE_NUMEL)
                scale = _on(grad_scale, device)
                (cpu_work if cpu else device_work).extend((group, k, t, scale) for t in tiles(lists, tile_numel))
        for item in device_work:  # launches are asynchronous already
            _update(*item)
        run_tiles(cpu_work, self.workers or torch.get_num_threads())
        for group, params in fused:
            self._step_fused(group, k, params, grad_scale)
        self.fused_numel = sum(p.numel() for _, params in fused for p in params)
        for params, xs in write_back:
            torch._foreach_copy_(params, xs)
        if shared:
            self._step_one_by_one(k, shared, grad_scale)
        self.state["k"] += 1
        return loss

    def _fuses(self, group: dict, device: torch.device, dtype: torch.dtype, params: list[torch.Tensor]) -> bool:
        """Whether this bucket's large tensors take the compiled one-pass update (see `fused`)."""
        if self.fused is False or device.type != "cpu" or dtype != torch.float32:
            return False
        if group["momentum"] == 0 or group.get("decouple_decay", False):
            return False  # the compiled update is the paper's form: momentum, decay added to the gradient
        if self.fused is None and sum(p.numel() for p in params) < FUSED_MIN_GROUP_NUMEL:
            return False
        return fused_kernel() is not None

    def _step_fused(self, group: dict, k: int, params: list[torch.Tensor], grad_scale=None) -> None:
        """The step of `params` (float32, contiguous, on the CPU) through the compiled update, a call per tensor."""
        scale = torch.ones(()) if grad_scale is None else torch.as_tensor(grad_scale, dtype=torch.float32).cpu()
        kernel = fused_kernel()
        lamb, ck = _step_lr(group) * math.sqrt(k + 1), torch.tensor(1 - group["momentum"], dtype=torch.float32)
        for p in params:
            st = self.state[p]
            kernel(p.detach().view(-1), p.grad.view(-1), st["grad_sum_sq"].view(-1), st["s"].view(-1),
                   st["x0"].view(-1), scale, lamb, group["weight_decay"], ck, group["eps"])

    def _step_one_by_one(self, k: int, shared: set[int], grad_scale=None) -> None:
        """Step the parameters that share storage one at a time, in group order, as madgrad.MADGRAD's loop.

        Several parameters over one tensor (the authors' tied embeddings, row 18
        of docs/fidelity.md) each update what the earlier ones left, and one
        whose state starts now takes that as its x0: the package's result,
        which one multi-tensor phase over all of them would not give.
        """
        for g, group in enumerate(self.param_groups):
            for i, p in enumerate(group["params"]):
                if id(p) not in shared:
                    continue
                self._start_state(g, i, p, group["momentum"])
                pieces, back = self._lists([p], group)
                _update(group, k, pieces, _on(grad_scale, p.device))
                if back:
                    torch._foreach_copy_(*back)

    def _lists(self, params: list[torch.Tensor], group: dict) -> tuple[list[list[torch.Tensor]], tuple | None]:
        """[x, grad, grad_sum_sq, s(, x0)] of parameters of one dtype, and (parameters, float32 copies) to write back.

        Low-precision parameters are stepped on float32 copies (their state is float32); others in place.
        """
        low = params[0].dtype in LOW_PRECISION
        work = torch.float32 if low else params[0].dtype
        # In place on the parameters themselves (the step runs without autograd): no detach per tensor.
        xs = [p.detach().float() for p in params] if low else list(params)
        states = [self.state[p] for p in params]
        lists = [xs, [p.grad if p.grad.dtype == work else p.grad.to(work) for p in params],
                 [st["grad_sum_sq"] for st in states], [st["s"] for st in states]]
        if group["momentum"] != 0:
            lists.append([st["x0"] for st in states])
        return lists, (([p.detach() for p in params], xs) if low else None)

    def _start_state(self, g: int, i: int, p: torch.Tensor, momentum: float) -> None:
        """Check parameter `i` of group `g` and create its state on first use (x0 = its value now)."""
        if p.grad.is_sparse:
            raise MamikitError(f"MADGRAD: parameter {i} of group {g} has a sparse gradient; this multi-tensor "
                               "step needs dense ones (madgrad.MADGRAD takes sparse gradients with "
                               "momentum=0 and weight_decay=0)")
        if p.is_complex():
            raise MamikitError(f"MADGRAD: parameter {i} of group {g} is complex; MADGRAD needs real parameters")
        state = self.state[p]
        if "grad_sum_sq" not in state:
            like = p.detach().float() if p.dtype in LOW_PRECISION else p.detach()
            state["grad_sum_sq"] = torch.zeros_like(like, memory_format=torch.preserve_format)
            state["s"] = torch.zeros_like(like, memory_format=torch.preserve_format)
            if momentum != 0:
                state["x0"] = like.clone()
        if momentum != 0 and "x0" not in state:
            raise MamikitError(f"MADGRAD: parameter {i} of group {g} was stepped with momentum 0 (its state has "
                               "no x0); momentum cannot be switched on mid-run")

    def _buckets(self, g: int, group: dict, skip: set[int] = frozenset()) -> dict[tuple, list[torch.Tensor]]:
        """The group's parameters with a gradient by (device, dtype), their state created on first use;
        `skip`: ids left out."""
        buckets = defaultdict(list)
        for i, p in enumerate(group["params"]):
            if p.grad is None or id(p) in skip:
                continue
            self._start_state(g, i, p, group["momentum"])
            buckets[(p.device, p.dtype)].append(p)
        return buckets


def _on(grad_scale, device):
    """`MADGRAD.step`'s grad_scale where a tile on `device` can use it (a number stays a number)."""
    if torch.is_tensor(grad_scale) and grad_scale.device != device:
        return grad_scale.to(device)
    return grad_scale


def _shared_storage(groups: list[dict]) -> set[int]:
    """ids of the parameters with a gradient whose storage another parameter with a gradient also uses."""
    owners = defaultdict(list)
    for group in groups:
        for p in group["params"]:
            if p.grad is not None:
                owners[(p.device, p.untyped_storage().data_ptr())].append(id(p))
    return {i for ids in owners.values() if len(ids) > 1 for i in ids}


def clip_coefficient(params, max_norm: float) -> torch.Tensor:
    """``clip_grad_norm_``'s factor for these parameters' gradients, computed as it does, without scaling them.

    min(1, max_norm / (total 2-norm + 1e-6)) as a 0-d tensor on the gradients'
    device (no host synchronisation); pass it to ``MADGRAD.step(grad_scale=...)``.
    """
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.tensor(1.0)
    norms = torch._foreach_norm(grads, 2.0)
    device = grads[0].device
    if any(n.device != device for n in norms):  # parameters on several devices: the norms meet on the first's
        norms = [n.to(device) for n in norms]
    total = torch.linalg.vector_norm(torch.stack(norms), 2.0)
    return torch.clamp(max_norm / (total + 1e-6), max=1.0)


def run_tiles(work: list[tuple], workers: int) -> None:
    """Run `_update` on every (group, k, pieces) item, spread over `workers` threads that take items in turn.

    A few tiles (a small model) stay on the calling thread: threads would not pay for themselves.
    """
    if workers < 2 or len(work) < 2 * workers:
        for item in work:
            _update(*item)
        return
    queue, lock = iter(work), threading.Lock()

    def drain():
        with torch.no_grad():  # grad mode is per thread
            while True:
                with lock:
                    item = next(queue, None)
                if item is None:
                    return
                _update(*item)

    with ThreadPoolExecutor(workers) as pool:
        for done in [pool.submit(drain) for _ in range(workers)]:
            done.result()  # re-raises a worker's error


def fused_update(x, grad, nu, s, x0, scale, lamb: float, decay: float, ck: float, eps: float) -> None:
    """One MADGRAD step (momentum, decay added to the gradient) of flat float32 tensors, in place.

    The arithmetic of `_update`, in its order: g = grad * scale + decay x,
    nu += lamb g g, s += lamb g, x = lerp(x, x0, ck) - ck s / (nu^(1/3) + eps), with a zero step where
    that denominator is 0 (eps = 0 and no gradient yet).
    Compiled (`fused_kernel`) it is one vectorised multi-threaded loop that
    reads each array once and writes x, nu and s once, where the tiled step
    makes about ten passes over each tile (3x faster at the paper's sizes on
    2 cores, ``bench/optimizer_step.py``). `scale` (the clipping factor, 1
    for none) and `ck` (1 - momentum) are 0-d float32 tensors, the other
    numbers Python floats: none of them is compiled in as a constant.
    """
    g = grad * scale + x * decay
    nu.copy_(nu + lamb * g * g)
    s.copy_(s + lamb * g)
    w = torch.exp(torch.log(nu) * (1.0 / 3.0)) + eps  # `cube_root`'s form
    # w = 0 only with eps = 0 where nothing was seen (nu = s = 0): infinity there makes the step 0, not 0/0,
    # as `_denominator` and the package do. A select in the same loop, so eps is not compiled in as a branch.
    w = torch.where(w == 0, math.inf, w)
    x.copy_(torch.lerp(x, x0, ck) + (-ck) * (s / w))


_FUSED: dict = {}


def fused_kernel():
    """`fused_update` compiled by ``torch.compile`` (once per process; dynamic sizes), or None where it cannot be.

    The first call compiles (a few seconds; inductor caches the C++ on disk).
    Without a working C++ compiler the compile fails: a warning says so once
    and the tiled step stays in use.
    """
    if "kernel" not in _FUSED:
        kernel = torch.compile(fused_update, dynamic=True, fullgraph=True)
        try:
            # Compiled on a large example: inductor sizes its loops (threads, vector width) from it.
            one = torch.ones(FUSED_MIN_NUMEL * 16)
            with torch.no_grad():
                kernel(one.clone(), one.clone(), one.clone(), one.clone(), one.clone(), torch.ones(()), 1.0, 0.0,
                       torch.tensor(0.1), 1e-6)
        except Exception as err:  # noqa: BLE001 - any compiler failure leaves the tiled step
            import warnings

            warnings.warn(f"MADGRAD: the compiled one-pass update is unavailable ({type(err).__name__}: "
                          f"{str(err).splitlines()[0] if str(err) else ''}); stepping with the tiled update",
                          RuntimeWarning, stacklevel=3)
            kernel = None
        _FUSED["kernel"] = kernel
    return _FUSED["kernel"]


def _denominator(nu: list[torch.Tensor], eps: float) -> list[torch.Tensor]:
    """nu^(1/3) + eps; where that is 0 (eps = 0), infinity, so that s / w gives a zero step."""
    w = cube_root(nu)
    if eps == 0:
        for t in w:  # a rare setting; a per-tensor loop is fine
            t.masked_fill_(t == 0, math.inf)
    else:
        torch._foreach_add_(w, eps)
    return w


def _step_lr(group: dict) -> float:
    """The learning rate a step uses: lr + eps when lr != 0, as madgrad.MADGRAD does for stability."""
    return group["lr"] + group["eps"] if group["lr"] != 0.0 else group["lr"]


def _update(group: dict, k: int, pieces: list[list[torch.Tensor]], scale=None) -> None:
    """One MADGRAD step on one tile: pieces = [x, grad, grad_sum_sq, s(, x0)], in the package's float order.

    `scale` (None, a number or a 0-d tensor on the tile's device) multiplies the gradients first.
    """
    eps, momentum = group["eps"], group["momentum"]
    decay, decouple = group["weight_decay"], group.get("decouple_decay", False)
    lr = _step_lr(group)
    lamb = lr * math.sqrt(k + 1)
    ck = 1 - momentum
    x, grad, nu, s = pieces[:4]
    if scale is not None:
        grad = torch._foreach_mul(grad, scale)  # as clip_grad_norm_'s multiply, on a copy
        if decay != 0 and not decouple:
            torch._foreach_add_(grad, x, alpha=decay)
    elif decay != 0 and not decouple:
        grad = torch._foreach_add(grad, x, alpha=decay)  # p.grad itself stays as it is
    # decoupled decay: x_{k+1} -= lr' decay x_k, with x_k kept aside (an experimental option, not the fast path)
    shrink = torch._foreach_mul(x, -lr * decay) if decay != 0 and decouple else None
    if momentum != 0:
        torch._foreach_addcmul_(nu, grad, grad, value=lamb)
        torch._foreach_add_(s, grad, alpha=lamb)
        # x_{k+1} = (1 - c) x_k + c z_{k+1} = lerp(x_k, x_0, c) - c s_{k+1} / w_{k+1}: two in-place
        # passes, no z (the package forms z, then scales and adds; the results differ by rounding only)
        torch._foreach_lerp_(x, pieces[4], ck)
        torch._foreach_addcdiv_(x, s, _denominator(nu, eps), value=-ck)
    else:
        # x_{k+1} = x_0 - s_{k+1} / w_{k+1} with x_0 = x_k + s_k / w_k, both added into x in place
        torch._foreach_addcdiv_(x, s, _denominator(nu, eps), value=1)
        torch._foreach_addcmul_(nu, grad, grad, value=lamb)
        torch._foreach_add_(s, grad, alpha=lamb)
        torch._foreach_addcdiv_(x, s, _denominator(nu, eps), value=-1)
    if shrink is not None:
        torch._foreach_add_(x, shrink)
