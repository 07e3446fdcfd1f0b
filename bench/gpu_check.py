"""GPU check: paper-sized experiment 30 (random weights) for a few steps in fp32 and with AMP; one JSON line.

    python bench/gpu_check.py            # on a CUDA machine, under five minutes
    python bench/gpu_check.py --cpu      # a smoke run on the CPU: demo profile, tiny steps (for the tests)
    python bench/gpu_check.py --compile  # also the compiled step (TrainConfig.compile): minutes more to compile

Builds a small synthetic meme set and its feature store with the `paper`
profile's real architectures at random weights (nothing downloaded), then
trains experiment 30 (section 5.1.4: multi encoders, proj_align, MAMI + FBHM)
from the same initial weights and the same batches twice: in float32 and with
mixed precision (`TrainConfig.amp`: bf16 where supported, else fp16 with a
GradScaler). It prints samples/s and peak GPU memory of each and the largest
difference of the per-step losses between the two; per precision also the
profiler's CPU time in operators and GPU time in kernels per training step
(``<precision>_cpu_ms_per_step``, ``<precision>_gpu_kernel_ms_per_step``: a
step whose CPU time is the larger is bound by its launches) and evaluation's
memes per second over the synthetic splits (``<precision>_eval_memes_per_s``). Without CUDA it says so and
exits 0.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
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
from mamikit.optim import MADGRAD
from mamikit.profiles import get_profile
from mamikit.evaluation import batch_for
from mamikit.runs import build_model, prepare_data
from mamikit.store import FeatureStore
from mamikit.synthetic import generate
from mamikit.train import TrainConfig, compiled_step, optimizer_step, train, train_step
from mamikit.utils import amp_dtype, seed_everything


def _steps(model, experiment, tasks, data, batches, device, amp: bool, pos_weight, runner=None):
    """Train `batches` one optimiser step each (train.py's optimiser) -> (losses, seconds, memes seen, seconds per step).

    The first step warms up kernels and allocations (and compiles, with a `runner` from train.compiled_step, which
    then runs the forward and backward passes) and is not timed; `_steps.first_s` keeps its seconds.
    """
    cfg = TrainConfig()
    optimizer = MADGRAD(param_groups(model, cfg.weight_decay, experiment.decay_by_name), lr=cfg.lr)
    scaler = torch.amp.GradScaler("cuda") if amp and amp_dtype() == torch.float16 else None
    losses, times = [], []
    model.train()
    for i, (name, index) in enumerate(batches):
        t0 = time.perf_counter()
        torch.manual_seed(i)  # the same dropout masks in every precision
        batch = batch_for(model, experiment, data[(name, "train")], index, True).to(device)
        terms = train_step(model if runner is None else runner, batch, experiment, tasks, 1, amp, scaler, pos_weight)
        optimizer_step(model, optimizer, cfg.clip_norm, scaler)
        losses.append(float(terms["loss"]))  # waits for the step to finish
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    seen = sum(len(index) for _, index in batches[1:])
    _steps.first_s = times[0]
    return losses, sum(times[1:]), seen, times[1:]


@contextlib.contextmanager
def _autocast_dtype(dtype: str | None):
    """Within the block, MAMIKIT_AMP_DTYPE names `dtype` (None: left as it is); restored after."""
    before = os.environ.get("MAMIKIT_AMP_DTYPE")
    if dtype:
        os.environ["MAMIKIT_AMP_DTYPE"] = dtype
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("MAMIKIT_AMP_DTYPE", None)
        else:
            os.environ["MAMIKIT_AMP_DTYPE"] = before


def _eval_loss(model, experiment, tasks, data, batch_ref, device, amp: bool, pos_weight) -> float:
    """The loss of one batch in eval mode (no dropout) at the model's initial weights."""
    from mamikit.losses import dataset_loss
    from mamikit.evaluation import autocast

    name, index = batch_ref
    model.eval()
    batch = batch_for(model, experiment, data[(name, "train")], index, True).to(device)
    with torch.no_grad(), autocast(device, amp):
        output = model(batch)
        loss, _ = dataset_loss(output, batch, [t for t in tasks if t.dataset == name], experiment.proj_align,
                               experiment.contrastive, pos_weight=pos_weight, align_all_pairs=experiment.align_all_pairs,
                               contrastive_as_coded=experiment.contrastive_as_coded)
    model.train()
    return float(loss)


def _profile(model, experiment, tasks, data, batches, device, amp: bool, pos_weight, runner=None) -> str:
    """Where the time of a few training steps goes: the top operations by self CUDA time (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    _steps(model, experiment, tasks, data, batches[:2], device, amp, pos_weight, runner)  # warm
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        _steps(model, experiment, tasks, data, batches[:4], device, amp, pos_weight, runner)
    return prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=14, max_name_column_width=60)


def _step_profile(model, experiment, tasks, data, batches, device, amp: bool, pos_weight, runner=None) -> dict:
    """Per training step under torch.profiler: the CPU's time in operators and the GPU's in kernels (ms).

    CPU time: the operators' self CPU time summed (dispatch, launches and what
    runs on the host); kernel time: the durations of the CUDA kernels summed (0
    without CUDA). Where the first is the larger, a step is bound by launching
    its work, not by the GPU (docs/performance.md "Step overhead: operators per meme").
    """
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    steps = batches[:5]
    _steps(model, experiment, tasks, data, steps[:2], device, amp, pos_weight, runner)  # warm
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        _steps(model, experiment, tasks, data, steps, device, amp, pos_weight, runner)
    n = len(steps)  # _steps runs all of them (its first is only left out of its timing)
    events = prof.events()
    cpu_us = sum(e.self_cpu_time_total for e in events if e.device_type == DeviceType.CPU)
    kernel_us = sum(e.time_range.elapsed_us() for e in events if e.device_type == DeviceType.CUDA)
    return {"cpu_ms_per_step": round(cpu_us / 1e3 / n, 2), "gpu_kernel_ms_per_step": round(kernel_us / 1e3 / n, 2)}


def _eval_rate(model, experiment, data, device, amp: bool, batch_size: int) -> float:
    """Memes per second of `evaluation.predict_split` over every split in `data`, after one warm-up split."""
    from mamikit.evaluation import predict_split

    splits = list(data.values())
    predict_split(model, experiment, splits[0], batch_size, device=device, amp=amp)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for split in splits:
        predict_split(model, experiment, split, batch_size, device=device, amp=amp)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return round(sum(len(split) for split in splits) / (time.perf_counter() - t0), 1)


def _log_values(run_dir: Path) -> dict[tuple, float]:
    """A run's log.jsonl as {key: value}: evaluation scores by (step, split, task, label, metric), losses by step and term."""
    values = {}
    for line in (run_dir / "log.jsonl").read_text().splitlines():
        row = json.loads(line)
        if row.get("kind") == "loss":
            values.update({("loss", row["step"], term): v for term, v in row["terms"].items()})
        else:
            values[(row["step"], row["split"], row["task"], row["label"], row["metric"])] = row["value"]
    return values


def _resume_check(data_root: Path, store_root: Path, profile, work: Path, amp: bool) -> dict:
    """Train one short epoch of experiment 30 twice straight and once stopped after 2 evaluations and resumed.

    The resumed run restores the CUDA random states and the GradScaler from its
    checkpoint; its log should differ from a straight run's no more than two
    straight runs differ from each other (the GPU's own nondeterminism).
    """
    cfg = TrainConfig(epochs=1, evals_per_epoch=4, accumulation=2, amp=amp, checkpoint_every=1, keep_weights="last",
                      local_dir=str(work / "local"))
    for name in ("straight", "again"):
        train("30", data_root, store_root, work / name, profile, cfg, progress=False)
    train("30", data_root, store_root, work / "resumed", profile, cfg, progress=False, stop_after_evals=2)
    train("30", data_root, store_root, work / "resumed", profile, cfg, progress=False, resume=True)
    logs = {name: _log_values(work / name) for name in ("straight", "again", "resumed")}

    def max_diff(a, b):
        if logs[a].keys() != logs[b].keys():
            return None  # rows missing or written twice
        return max(abs(logs[a][k] - logs[b][k]) for k in logs[a])

    return {"rows": len(logs["straight"]), "rerun_max_abs_diff": max_diff("straight", "again"),
            "resume_max_abs_diff": max_diff("straight", "resumed")}


def main(argv=None) -> int:
    """Run the check and print one JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="smoke run on the CPU with the demo profile and tiny steps")
    parser.add_argument("--steps", type=int, default=None, help="optimiser steps per precision (default 12; --cpu 2)")
    parser.add_argument("--batch-size", type=int, default=16, help="memes per batch (paper: 16)")
    parser.add_argument("--no-resume", action="store_true", help="skip the stop-and-resume check")
    parser.add_argument("--profile", action="store_true", help="also print each precision's top operations (stderr)")
    parser.add_argument("--compile", action="store_true",
                        help="also train float32 and mixed precision with the compiled step (TrainConfig.compile): "
                             "legs fp32_compiled and amp_compiled, their compile's seconds in <leg>_first_step_s")
    args = parser.parse_args(argv)
    if not args.cpu and not torch.cuda.is_available():
        print(json.dumps({"cuda": False, "message": "no CUDA device here: nothing to check (--cpu runs a CPU smoke test)"}))
        return 0
    device = torch.device("cpu" if args.cpu else "cuda")
    cuda = device.type == "cuda"
    steps = args.steps or (2 if args.cpu else 12)
    profile = get_profile("demo" if args.cpu else "paper", weights="random")
    experiment = get_experiment("30")
    t_start = time.perf_counter()
    # Precisions: float32, the machine's mixed precision, and float16 with its GradScaler where that is not it.
    legs = [("fp32", False, None), ("amp", True, None)]
    if cuda and amp_dtype() != torch.float16:
        legs.append(("amp_fp16", True, "float16"))
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
        result = {"cuda": cuda, "device": torch.cuda.get_device_name(0) if cuda else "cpu",
                  "profile": f"{profile.name} (weights random)", "experiment": "30", "batch_size": args.batch_size,
                  "steps": steps, "amp_dtype": str(amp_dtype()).replace("torch.", "") if cuda else None,
                  "torch": torch.__version__}
        losses, eval_loss = {}, {}
        compiled_legs = [(f"{label}_compiled", amp, dtype) for label, amp, dtype in legs[:2]] if args.compile else []
        for label, amp, dtype in legs + compiled_legs:
            use_amp = amp and cuda
            with _autocast_dtype(dtype):
                seed_everything(0)
                model = build_model(experiment, profile, store.dims, tasks, device, store.special_ids)  # the same initial weights every time
                if cuda:
                    torch.cuda.reset_peak_memory_stats()
                eval_loss[label] = _eval_loss(model, experiment, tasks, data, batches[0], device, use_amp, pos_weight)
                runner = compiled_step(model) if label.endswith("_compiled") else None
                losses[label], seconds, seen, step_times = _steps(model, experiment, tasks, data, batches, device, use_amp,
                                                                  pos_weight, runner)
                result[f"{label}_first_step_s"] = round(_steps.first_s, 2)
                result[f"{label}_step_s"] = [round(t, 4) for t in step_times]
                # steady state: the median step (a step that meets new shapes pays for kernel selection and loading)
                result[f"{label}_samples_per_s"] = round(args.batch_size / statistics.median(step_times), 1)
                result[f"{label}_samples_per_s_mean"] = round(seen / seconds, 1)
                if cuda:
                    result[f"{label}_peak_gpu_mib"] = round(torch.cuda.max_memory_allocated() / 2**20)
                # launch-bound or kernel-bound: the profiler's CPU and kernel time per step; evaluation's rate
                profiled = _step_profile(model, experiment, tasks, data, batches, device, use_amp, pos_weight, runner)
                result.update({f"{label}_{k}": v for k, v in profiled.items()})
                result[f"{label}_eval_memes_per_s"] = _eval_rate(model, experiment, data, device, use_amp,
                                                                 TrainConfig().eval_batch_size)
                if args.profile:
                    table = _profile(model, experiment, tasks, data, batches, device, use_amp, pos_weight, runner)
                    print(f"--- {label}: the top operations of 4 training steps\n{table}", file=sys.stderr)
            del model
        model = build_model(experiment, profile, store.dims, tasks, "cpu", store.special_ids)
        result["trainable_parameters"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
        result["loss_fp32_first_last"] = [round(losses["fp32"][0], 5), round(losses["fp32"][-1], 5)]
        for label, _, _ in legs[1:]:
            diffs = [abs(a - b) for a, b in zip(losses["fp32"], losses[label])]
            suffix = "" if label == "amp" else f"_{label}"
            # the same weights and no dropout (CUDA draws other masks for other dtypes): precision alone
            result[f"eval_loss_diff_fp32_vs_amp{suffix}"] = round(abs(eval_loss["fp32"] - eval_loss[label]), 7)
            result[f"max_abs_loss_diff_fp32_vs_amp{suffix}"] = round(max(diffs), 6)
            result[f"max_rel_loss_diff_fp32_vs_amp{suffix}"] = round(max(d / max(abs(a), 1e-8) for d, a in zip(diffs, losses["fp32"])), 6)
        result["extract_s"] = round(extract_s, 1)
        if not args.no_resume:
            t0 = time.perf_counter()
            for label, amp, dtype in legs[-1:] if cuda else legs[:1]:  # the most stateful precision on a GPU
                with _autocast_dtype(dtype):
                    check = _resume_check(data_root, store_root, profile, Path(tmp) / f"resume-{label}", amp and cuda)
                result.update({f"resume_{label}_{k}": v for k, v in check.items()})
            result["resume_s"] = round(time.perf_counter() - t0, 1)
        result["total_s"] = round(time.perf_counter() - t_start, 1)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
