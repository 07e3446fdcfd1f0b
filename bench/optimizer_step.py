"""One MADGRAD step at the paper's sizes: the madgrad package against `mamikit.optim.MADGRAD` (section 4).

Section 4 trains with MADGRAD, lr 2e-4, weight decay 5e-4 on every parameter
except biases and LayerNorm weights. This benchmark takes the trainable
parameters of experiment 30 built at the `paper` sizes with random weights
(hidden 768, two 6-layer 8-head image encoders, a 6-layer class-query decoder,
projections and heads: about 117M parameters in 281 tensors; the BERT-base
text encoder is frozen in the paper, so it has no optimiser step), split into
the two groups of ``mamikit.model.param_groups``. ``--quick`` builds it with
one encoder and decoder layer instead of six (about 22M parameters).

Both optimisers start from the same parameters and get the same gradients
(seeded, about 1e-3) before every step, copied in outside the timed region
(the package adds its weight decay into ``p.grad``). After untimed warm-up
steps (the first one creates the state), the timed steps alternate between
the two, so that a change in the machine's load hits both alike; medians are
reported. ``max_rel_diff`` compares the parameters after the same number of
steps: the largest |ours - package| over the largest |package|, worst tensor.

    python bench/optimizer_step.py --quick
    python bench/optimizer_step.py --steps 7 --threads 2
    python bench/optimizer_step.py --device cuda

On the CPU, mamikit's step at these sizes is its compiled one-pass update
(``mamikit.optim.fused_update``) for the large tensors; ``first s`` includes
its compile.

The last line printed is one JSON object with the figures. On a CPU shared
with other processes the timings are noisy, and OpenMP's busy-waiting makes
them noisier; ``OMP_WAIT_POLICY=passive`` in the environment takes that out
for both optimisers (the JSON line records the setting).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time

import torch

LR, WEIGHT_DECAY = 2e-4, 5e-4  # section 4
DATASETS = ("MAMI", "FBHM")  # experiment 30's tasks


def paper_parameters(layers: int, seed: int) -> list[dict]:
    """The two parameter groups of experiment 30 at paper sizes (random weights), as detached leaf tensors."""
    from transformers import BertConfig, BertModel

    from mamikit.data import load_tasks
    from mamikit.experiments import get_experiment
    from mamikit.model import MamiModel, ModelConfig, param_groups
    from mamikit.profiles import get_profile

    exp = get_experiment("30")
    tasks = load_tasks()
    torch.manual_seed(seed)
    text = BertModel(BertConfig()).eval()  # bert-base with its pooler, frozen as in the paper
    paper = get_profile("paper")
    cfg = ModelConfig.from_experiment(exp, dataclasses.replace(paper, encoder_layers=layers, decoder_layers=layers),
                                      {"clip": 640, "detr": 256}, tuple(t for name in DATASETS for t in tasks[name]),
                                      cls_token_id=101, sep_token_id=102)  # uncased BERT's [CLS] and [SEP]
    model = MamiModel(cfg, text)
    return [dict(g, params=[p.detach().clone() for p in g["params"]]) for g in param_groups(model, WEIGHT_DECAY)]


def _copy(groups: list[dict], device) -> list[dict]:
    return [dict(g, params=[p.to(device, copy=True).requires_grad_() for p in g["params"]]) for g in groups]


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1-layer encoders and decoder (~22M parameters), 3 timed steps")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per optimiser")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per optimiser first")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: PyTorch's)")
    ap.add_argument("--workers", type=int, default=None, help="mamikit's CPU worker threads (default: torch's threads)")
    ap.add_argument("--tile-numel", type=int, default=None, help="mamikit's elements per tile (default: its own)")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.quick:
        args.steps = min(args.steps, 3)
    if args.steps < 1 or args.warmup < 1:
        raise SystemExit("--steps and --warmup must be positive (the first step creates the state)")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    if args.threads:
        torch.set_num_threads(args.threads)
    import madgrad

    from mamikit.optim import CPU_TILE_NUMEL, DEVICE_TILE_NUMEL, MADGRAD

    device = torch.device(args.device)
    load_start = os.getloadavg()[0]
    t0 = time.perf_counter()
    groups = paper_parameters(1 if args.quick else 6, args.seed)
    n_params = sum(p.numel() for g in groups for p in g["params"])
    n_tensors = sum(len(g["params"]) for g in groups)
    gen = torch.Generator().manual_seed(args.seed + 1)
    grads = [(torch.randn(p.shape, generator=gen) * 1e-3).to(device) for g in groups for p in g["params"]]
    opts = {
        "package": madgrad.MADGRAD(_copy(groups, device), lr=LR),
        "foreach": MADGRAD(_copy(groups, device), lr=LR, tile_numel=args.tile_numel, workers=args.workers),
    }
    del groups
    setup_s = time.perf_counter() - t0

    def step(opt) -> float:
        params = [p for g in opt.param_groups for p in g["params"]]
        for p, grad in zip(params, grads):
            if p.grad is None:
                p.grad = grad.clone()
            else:
                p.grad.copy_(grad)
        _sync(device)
        t = time.perf_counter()
        opt.step()
        _sync(device)
        return time.perf_counter() - t

    warm = {name: [step(opt) for _ in range(args.warmup)] for name, opt in opts.items()}
    times = {name: [] for name in opts}
    for _ in range(args.steps):
        for name, opt in opts.items():
            times[name].append(step(opt))
    load_end = os.getloadavg()[0]

    ref, ours = ([p.detach() for g in opts[n].param_groups for p in g["params"]] for n in ("package", "foreach"))
    diff = max(((a - b).abs().max() / b.abs().max().clamp(min=1e-30)).item() for a, b in zip(ours, ref))
    med = {name: statistics.median(t) for name, t in times.items()}
    speedup = med["package"] / med["foreach"]

    threads = f", {torch.get_num_threads()} threads" if device.type == "cpu" else ""
    print(f"\nMADGRAD step over experiment 30's trainable parameters at paper sizes{' (--quick: 1 layer)' if args.quick else ''}: "
          f"{n_params / 1e6:.1f}M in {n_tensors} tensors, device {args.device}{threads}; "
          f"{args.warmup} warm-up + {args.steps} timed steps each, alternating")
    print(f"{'':24s}{'median s':>10s}{'min s':>10s}{'max s':>10s}{'ns/param':>10s}{'first s':>10s}")
    for name, label in (("package", "madgrad.MADGRAD"), ("foreach", "mamikit.optim.MADGRAD")):
        t = times[name]
        print(f"{label:24s}{med[name]:10.3f}{min(t):10.3f}{max(t):10.3f}{med[name] / n_params * 1e9:10.2f}{warm[name][0]:10.3f}")
    print(f"{'speedup (medians)':24s}{speedup:10.2f}")
    print(f"parameters after {args.warmup + args.steps} steps: max relative difference {diff:.2e}; "
          f"{opts['foreach'].fused_numel / 1e6:.1f}M of them stepped by the compiled one-pass update "
          "(its compile is in the first step)")
    print(f"load average {load_start:.1f} at the start, {load_end:.1f} at the end; set-up {setup_s:.0f} s; "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')}")
    summary = {
        "package_step_s": round(med["package"], 4),
        "foreach_step_s": round(med["foreach"], 4),
        "step_speedup": round(speedup, 3),
        "max_rel_diff": diff,
        "package_steps_s": [round(t, 4) for t in times["package"]],
        "foreach_steps_s": [round(t, 4) for t in times["foreach"]],
        "params": n_params,
        "tensors": n_tensors,
        "steps": args.warmup + args.steps,
        "timed_steps": args.steps,
        "quick": args.quick,
        "device": args.device,
        "threads": torch.get_num_threads(),
        "workers": (args.workers or torch.get_num_threads()) if device.type == "cpu" else 1,
        "tile_numel": args.tile_numel or (CPU_TILE_NUMEL if device.type == "cpu" else DEVICE_TILE_NUMEL),
        "fused_numel": opts["foreach"].fused_numel,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "load_average_start": round(load_start, 2),
        "load_average_end": round(load_end, 2),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
