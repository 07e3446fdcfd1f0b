"""GPU check: paper-sized experiment 30 (random weights) for a few steps in fp32 and with AMP; one JSON line.

    python bench/gpu_check.py            # on a CUDA machine, under five minutes
    python bench/gpu_check.py --cpu      # a smoke run on the CPU: demo profile, tiny steps (for the tests)

Builds a small synthetic meme set and its feature store with the `paper`
profile's real architectures at random weights (nothing downloaded), then
trains experiment 30 (section 5.1.4: multi encoders, proj_align, MAMI + FBHM)
from the same initial weights and the same batches twice: in float32 and with
mixed precision (`TrainConfig.amp`: bf16 where supported, else fp16 with a
GradScaler). It prints samples/s and peak GPU memory of each and the largest
difference of the per-step losses between the two. Without CUDA it says so and
exits 0.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mamikit.batching import epoch_batches
from mamikit.experiments import experiment_tasks, get_experiment
from mamikit.extraction import extract
from mamikit.losses import label_pos_weights
from mamikit.model import param_groups
from mamikit.profiles import get_profile
from mamikit.runs import batch_for, build_model, prepare_data
from mamikit.store import FeatureStore
from mamikit.synthetic import generate
from mamikit.train import TrainConfig, optimizer_step, train_step
from mamikit.utils import amp_dtype, seed_everything


def _steps(model, experiment, tasks, data, batches, device, amp: bool, pos_weight) -> tuple[list[float], float, int]:
    """Train `batches` one optimiser step each; per-step losses, seconds, memes seen."""
    import madgrad

    cfg = TrainConfig()
    optimizer = madgrad.MADGRAD(param_groups(model, cfg.weight_decay, experiment.decay_by_name), lr=cfg.lr)
    scaler = torch.amp.GradScaler("cuda") if amp and amp_dtype() == torch.float16 else None
    losses, seen = [], 0
    model.train()
    for i, (name, index) in enumerate(batches):
        if i == 1 and device.type == "cuda":  # the first step warms up kernels and allocations
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            seen = 0
        elif i == 0:
            t0 = time.perf_counter()
        torch.manual_seed(i)  # the same dropout masks in both precisions
        batch = batch_for(model, experiment, data[(name, "train")], index, True).to(device)
        terms = train_step(model, batch, experiment, tasks, 1, amp, scaler, pos_weight)
        optimizer_step(model, optimizer, cfg.clip_norm, scaler)
        losses.append(float(terms["loss"]))
        seen += len(index)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return losses, time.perf_counter() - t0, seen


def main(argv=None) -> int:
    """Run the check and print one JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="smoke run on the CPU with the demo profile and tiny steps")
    parser.add_argument("--steps", type=int, default=None, help="optimiser steps per precision (default 12; --cpu 2)")
    parser.add_argument("--batch-size", type=int, default=16, help="memes per batch (paper: 16)")
    args = parser.parse_args(argv)
    if not args.cpu and not torch.cuda.is_available():
        print(json.dumps({"cuda": False, "message": "no CUDA device here: nothing to check (--cpu runs a CPU smoke test)"}))
        return 0
    device = torch.device("cpu" if args.cpu else "cuda")
    steps = args.steps or (2 if args.cpu else 12)
    profile = get_profile("demo" if args.cpu else "paper", weights="random")
    experiment = get_experiment("30")
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mamikit-gpu-check-") as tmp:
        data_root, store_root = Path(tmp) / "data", Path(tmp) / "store"
        n = max(2 * args.batch_size, 8) if args.cpu else 6 * args.batch_size
        generate(data_root, seed=1, n_mami=n, n_mami_test=8, n_fbhm=n, progress=False)
        extract(data_root, store_root, profile, batch_size=16, device=device, progress=False)
        extract_s = time.perf_counter() - t_start
        store = FeatureStore(store_root)
        tasks = experiment_tasks(experiment)
        data = prepare_data(experiment, data_root, store)
        pos_weight = label_pos_weights(tasks, {name: (d.targets, d.labels) for (name, split), d in data.items() if split == "train"})
        sizes = {name: len(data[(name, "train")]) for name in experiment.datasets}
        order = epoch_batches(sizes, args.batch_size, np.random.default_rng(0))
        batches = [order[i % len(order)] for i in range(steps + 1)]
        result = {"cuda": device.type == "cuda", "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
                  "profile": f"{profile.name} (weights random)", "experiment": "30", "batch_size": args.batch_size,
                  "steps": steps, "amp_dtype": str(amp_dtype()).replace("torch.", "") if device.type == "cuda" else None,
                  "torch": torch.__version__}
        losses = {}
        for label, amp in (("fp32", False), ("amp", True)):
            seed_everything(0)
            model = build_model(experiment, profile, store, tasks, device)  # the same initial weights both times
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            losses[label], seconds, seen = _steps(model, experiment, tasks, data, batches, device, amp and device.type == "cuda", pos_weight)
            result[f"{label}_samples_per_s"] = round(seen / seconds, 1)
            if device.type == "cuda":
                result[f"{label}_peak_gpu_mib"] = round(torch.cuda.max_memory_allocated() / 2**20)
            del model
        model = build_model(experiment, profile, store, tasks, "cpu")
        result["trainable_parameters"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
        diffs = [abs(a - b) for a, b in zip(losses["fp32"], losses["amp"])]
        result["loss_fp32_first_last"] = [round(losses["fp32"][0], 5), round(losses["fp32"][-1], 5)]
        result["max_abs_loss_diff_fp32_vs_amp"] = round(max(diffs), 6)
        result["max_rel_loss_diff_fp32_vs_amp"] = round(max(d / max(abs(a), 1e-8) for d, a in zip(diffs, losses["fp32"])), 6)
        result["extract_s"] = round(extract_s, 1)
        result["total_s"] = round(time.perf_counter() - t_start, 1)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
