"""The training loop of section 4: multi-task batches, MADGRAD, accumulation, evaluation schedule.

One explicit loop (`train`): batches drawn per algorithm 1, the loss of
equations 5-6 (`train_step`), gradients accumulated over 20 batches, clipped at
norm 0.5, MADGRAD with a linear warm-up schedule, and evaluations several times
per epoch on train, dev and test. What an evaluation writes -- log rows,
predictions, answer files, best checkpoints -- is `mamikit.runs`'s; the loop
saves its own state in the `last` checkpoint (safetensors weights plus JSON),
so `resume=True` continues a killed run exactly where its last evaluation left it,
and decides where checkpoints go and which weights a finished run keeps
(`TrainConfig.keep_weights`, docs/checkpoints.md "Checkpoints on Drive").
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import __version__
from .batching import epoch_batches
from .checkpoints import (copy_checkpoint, copy_if_changed, discard_after, kept_checkpoints, load_checkpoint,
                          local_checkpoints_dir, local_last_dir, newest_checkpoint, remove_local, save_checkpoint,
                          save_state_only)
from .evaluation import RunningPredictions, autocast, batch_for, record_evaluation
from .experiments import Experiment, experiment_tasks, get_experiment
from .losses import dataset_loss, label_pos_weights
from .model import Batch, MamiModel, param_groups
from .optim import MADGRAD, clip_coefficient
from .profiles import Profile, get_profile
from .provenance import RunLock, now, provenance
from .runlog import TrainingLog
from .runs import CONFIG_FILE, LOG_FILE, build_model, checkpoint_folder, open_run_dir, prepare_data, truncate_log
from .settings import TrainConfig
from .utils import MamikitError, amp_dtype, fault_point, get_logger, pick_device, seed_everything, write_json

log = get_logger(__name__)


# ----------------------------------------------------------------------------- training


@dataclass(frozen=True)
class StepPlan:
    """After which batches the loop steps the optimiser, what divides each loss, and the schedule's length (section 4).

    Section 4 accumulates the gradients of 20 batches per MADGRAD step under a
    linear warm-up and decay. Two readings (docs/fidelity.md row 21, the
    experiment's `schedule_as_coded`):

    - the paper's (``as_coded=False``): windows of `accumulation` batches run over
      the whole run's sequence of batches, across epoch boundaries; the run's
      last window may be shorter and is stepped too. Each loss is divided by
      its window's length, so a step follows its window's mean loss.
      ceil(n_batches * epochs / accumulation) steps.
    - the authors' trainer (``as_coded=True``): a step after batch index b of
      an epoch when (b + 1) % accumulation == 0, the index restarting every
      epoch, and gradients zeroed only after a step: an epoch's last
      n_batches % accumulation batches join the next epoch's first window, and
      the run's last ones are never stepped. Every loss is divided by
      `accumulation`. (n_batches // accumulation) * epochs steps, their `t_total`.

    The schedule spans exactly the steps taken (`linear_schedule`), so its
    rate reaches 0 with the last one. Where a batch falls is all a plan needs
    to know: a resumed run follows it from the checkpoint's (epoch, batch).
    """

    n_batches: int  # batches per epoch (every dataset's, algorithm 1)
    epochs: int  # epochs of the run
    accumulation: int  # batches per optimiser step
    as_coded: bool = False  # the authors' trainer's windows and t_total (Experiment.schedule_as_coded)

    def __post_init__(self):
        for name in ("n_batches", "epochs", "accumulation"):
            if getattr(self, name) < 1:
                raise MamikitError(f"step plan: {name} must be positive, got {getattr(self, name)}")
        if self.as_coded and self.n_batches < self.accumulation:
            raise MamikitError(f"step plan: accumulation {self.accumulation} exceeds the {self.n_batches} batches "
                               "of an epoch: the authors' schedule (schedule_as_coded) would never step")

    @property
    def total_steps(self) -> int:
        """Optimiser steps the run takes: the schedule's length."""
        if self.as_coded:
            return self.n_batches // self.accumulation * self.epochs
        return math.ceil(self.n_batches * self.epochs / self.accumulation)

    def steps_after(self, epoch: int, b: int) -> bool:
        """Whether the optimiser steps after batch `b` (0-based) of `epoch`."""
        if self.as_coded:
            return (b + 1) % self.accumulation == 0
        t = epoch * self.n_batches + b + 1  # batches of the run so far
        return t % self.accumulation == 0 or t == self.n_batches * self.epochs

    def loss_divisor(self, epoch: int, b: int) -> int:
        """What batch `b` of `epoch` divides its loss by: its window's length (paper), `accumulation` (authors)."""
        if self.as_coded:
            return self.accumulation
        t = epoch * self.n_batches + b
        return min(self.accumulation, self.n_batches * self.epochs - (t - t % self.accumulation))

    def step_batches(self) -> list[int]:
        """The run's batch counts (1-based, over all epochs) after which the optimiser steps."""
        return [e * self.n_batches + b + 1 for e in range(self.epochs) for b in range(self.n_batches)
                if self.steps_after(e, b)]


def linear_schedule(optimizer, plan: StepPlan, warmup_fraction: float):
    """Linear warm-up over int(steps * warmup_fraction) steps, then linear decay to 0 with the plan's last step.

    With warmup_fraction 0.1, int(steps * 0.1) is the authors' ``t_total // 10``
    (0.1 as a double lies just above a tenth, so the product never rounds below it).
    """
    from transformers import get_linear_schedule_with_warmup

    return get_linear_schedule_with_warmup(optimizer, int(plan.total_steps * warmup_fraction), plan.total_steps)


def _eval_points(n_batches: int, evals: int) -> set[int]:
    """Batch counts within an epoch after which to evaluate: evenly spread, the last at the epoch end."""
    return {max(1, round((k + 1) * n_batches / evals)) for k in range(evals)}


def train_step(model: MamiModel, batch: Batch, experiment: Experiment, tasks, window: int = 1, amp: bool = False,
               scaler=None, pos_weight: dict | None = None, return_probs: bool = False):
    """Forward, loss (eq. 5-6 over the tasks of the batch's dataset) and backward of one batch.

    Args:
        model: the model, in train mode.
        batch: one dataset's batch, on the model's device.
        experiment: whose auxiliary losses (proj_align, contrastive) are on.
        tasks: the model's tasks; those of other datasets are skipped.
        window: what the loss is divided by before its backward pass (`StepPlan.loss_divisor`): the
            batches of this accumulation window, so that they sum to the gradient of its mean loss (the
            authors' trainer divides by the accumulation count, also in a window carried over an epoch's end).
        amp: float16 autocast on CUDA.
        scaler: the GradScaler of mixed precision, or None.
        pos_weight: {task: {label: weight}} of the BCE's positive terms (`losses.label_pos_weights`), or None.
        return_probs: also return the batch's probabilities (the running train-split scores' input).
    Returns:
        The detached loss terms of `losses.dataset_loss` ("loss", per task "<task>/bce", ...), unscaled;
        with return_probs, (terms, {task: (B, k) detached float32 probabilities}).
    """
    with autocast(batch.text_ids.device, amp):
        output = model(batch)
        loss, terms = dataset_loss(output, batch, [t for t in tasks if t.dataset == batch.dataset],
                                   experiment.proj_align, experiment.contrastive, pos_weight=pos_weight,
                                   align_all_pairs=experiment.align_all_pairs,
                                   contrastive_as_coded=experiment.contrastive_as_coded,
                                   query_align=experiment.query_align)
    loss = loss / window
    (scaler.scale(loss) if scaler else loss).backward()
    if return_probs:
        return terms, {task: torch.sigmoid(logits.detach().float()) for task, logits in output.logits.items()}
    return terms


def optimizer_step(model: MamiModel, optimizer, clip_norm: float, scaler=None) -> None:
    """Close an accumulation window: clip the trainable gradients' norm, step (through the GradScaler), zero them.

    With mamikit's MADGRAD and no GradScaler the clipping factor goes into the
    step (`optim.clip_coefficient`), which scales each tile of gradients while
    it is in the cache: the same update as ``clip_grad_norm_`` then ``step()``,
    one pass over the gradients fewer.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if isinstance(optimizer, MADGRAD) and not scaler:
        optimizer.step(grad_scale=clip_coefficient(params, clip_norm))
        optimizer.zero_grad(set_to_none=True)
        return
    if scaler:
        scaler.unscale_(optimizer)
    torch.nn.utils.clip_grad_norm_(params, clip_norm)
    if scaler:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def train(experiment: Experiment | str, data_root, features_root, out_dir, profile: Profile | str = "demo",
          train_cfg: TrainConfig | None = None, resume: bool = False, progress: bool = True,
          stop_after_evals: int | None = None, outcome: dict | None = None) -> Path:
    """Train one experiment and write its run directory (docs/design.md "Run directory").

    The run directory is locked while it trains (mamikit.provenance.RunLock):
    a second process on the same run raises RunLocked naming the holder.

    Args:
        experiment: an Experiment or a paper experiment name.
        data_root: data folder with MAMI/ (and FBHM/ for multi-task).
        features_root: feature store written by `extract`.
        out_dir: the run directory.
        profile: profile name or Profile (must match the store's backbones).
        train_cfg: optimisation settings; None gives the paper's.
        resume: continue from the run's last checkpoint.
        progress: show a progress bar.
        stop_after_evals: stop (as if killed) after this many evaluations; for tests.
        outcome: a dict that receives "mode": "new" (trained from the start), "resume" (continued) or
            "complete" (found finished once locked, e.g. by another worker meanwhile: nothing trained).
    Returns:
        The run directory.
    """
    outcome = {} if outcome is None else outcome
    with RunLock(out_dir):
        return _train_locked(experiment, data_root, features_root, out_dir, profile, train_cfg, resume, progress,
                             stop_after_evals, outcome)


def _train_locked(experiment, data_root, features_root, out_dir, profile, train_cfg, resume, progress,
                  stop_after_evals, outcome: dict) -> Path:
    """train() once its run directory is locked."""
    from tqdm.auto import tqdm

    from .store import FeatureStore

    experiment = get_experiment(experiment) if isinstance(experiment, str) else experiment
    profile = get_profile(profile) if isinstance(profile, str) else profile
    cfg = train_cfg or TrainConfig()
    epochs = cfg.epochs or experiment.epochs
    out = Path(out_dir)
    device = pick_device(cfg.device)
    store = FeatureStore(training_store(features_root, cfg))
    check_store_profile(store, profile, features_root)
    tasks = experiment_tasks(experiment)
    config = {
        **run_settings(experiment, profile, cfg, epochs),
        # where checkpoints go and which stay, not what the run is: free to change on resume
        "checkpoints": {"every": cfg.checkpoint_every, "local_dir": cfg.local_dir, "keep_weights": cfg.keep_weights},
        "data": str(Path(data_root).resolve()),
        "features": str(Path(features_root).resolve()),
        "tasks": [dataclasses.asdict(t) for t in tasks],
        "mamikit_version": __version__,
        "provenance": provenance(device),  # versions, device, host, pid, started / finished
    }
    config = json.loads(json.dumps(config))  # the form it has when read back
    run_last, local_last = out / "checkpoints" / "last", local_last_dir(out, cfg.local_dir)
    # The newer of the local and the run folder's copy (the local one is gone after a new machine)
    source = newest_checkpoint(local_last, run_last) if resume else None
    if cfg.init_from and source is None:
        checkpoint_folder(cfg.init_from, "last", "init_from")  # refused before anything is written
    mode = open_run_dir(out, config, resume, last=source)
    outcome["mode"] = mode
    if mode == "complete":
        log.info("%s: already complete", out)
        return out
    resume = mode == "resume"
    if not resume:
        remove_local(local_last)  # left by an earlier run of this folder
    if cfg.amp and device.type != "cuda":
        log.warning("--amp: mixed precision needs CUDA; training on %s in float32", device)
    if profile.name == "paper" and device.type == "cpu":
        log.warning("training the paper profile on the CPU: expect days per run; a GPU runtime is the intended place")

    kept = kept_checkpoints(cfg.keep_weights, [t.name for t in tasks])
    # kept best checkpoints go where `last` goes: beside it on local disk, or straight into the run folder
    best_root = out / "checkpoints" if cfg.checkpoint_every == 1 else local_last.parent
    best_weights = {t.name: best_root / f"best-{t.name}" for t in tasks if f"best-{t.name}" in kept}
    seed_everything(cfg.seed)
    data = prepare_data(experiment, data_root, store)
    pos_weight = None
    if experiment.pos_weight:
        # Counted on the training split (docs/fidelity.md row 2) and kept with the run's settings.
        train_targets = {name: (d.targets, d.labels) for (name, split), d in data.items() if split == "train"}
        pos_weight = label_pos_weights(tasks, train_targets)
        config["pos_weight"] = pos_weight  # kept in `config`: the run's end rewrites the file with `finished`
        write_json(out / CONFIG_FILE, config)
    model = build_model(experiment, profile, store.dims, tasks, device, store.special_ids)
    optimizer = MADGRAD(param_groups(model, cfg.weight_decay, experiment.decay_by_name), lr=cfg.lr)
    sizes = {name: len(data[(name, "train")]) for name in experiment.datasets if (name, "train") in data}
    n_batches = sum(math.ceil(n / cfg.batch_size) for n in sizes.values())
    # section 4's accumulation windows, and a schedule as long as the steps they take (docs/fidelity.md row 21)
    plan = StepPlan(n_batches, epochs, cfg.accumulation, experiment.schedule_as_coded)
    scheduler = linear_schedule(optimizer, plan, cfg.warmup_fraction)
    # bf16 keeps float32's range and needs no loss scaling; fp16 does
    scaler = (torch.amp.GradScaler("cuda") if cfg.amp and device.type == "cuda" and amp_dtype() == torch.float16
              else None)

    state = {"epoch": 0, "batch_in_epoch": 0, "step": 0, "evals": 0, "best": {}, "complete": False}
    running = RunningPredictions()  # this epoch's training predictions, for the train-split scores
    if resume:
        extra = {}
        state = load_checkpoint(source, model, optimizer, scaler, extra=extra)
        running = RunningPredictions(extra, device)
        scheduler.last_epoch = state["scheduler_last_epoch"]
        lrs = [base * lam(scheduler.last_epoch) for base, lam in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
        for g, lr in zip(optimizer.param_groups, lrs):
            g["lr"] = lr
        scheduler._last_lr = lrs  # noqa: SLF001
        if state.get("complete"):
            outcome["mode"] = "complete"
            log.info("%s: already complete", out)
            return out
        truncate_log(out, state["step"])
        # local best checkpoints newer than the resumed state (it came from the run folder's older copy) are redone
        discard_after(local_last.parent.glob("best-*"), state["step"])
    else:
        if (out / LOG_FILE).exists():
            (out / LOG_FILE).unlink()
        if cfg.init_from:
            load_checkpoint(checkpoint_folder(cfg.init_from, "last", "init_from"), model)  # weights only

    eval_splits = {k: v for k, v in data.items() if v.labelled}
    training_log = TrainingLog(out, experiment.name, cfg.seed, state, resume)  # loss rows and TensorBoard scalars
    bar = tqdm(total=n_batches * epochs, initial=state["step"], desc=f"train {experiment.name}",
               disable=not progress, leave=False)
    for epoch in range(state["epoch"], epochs):
        order = epoch_batches(sizes, cfg.batch_size, np.random.default_rng([cfg.seed, epoch]))
        points = _eval_points(len(order), cfg.evals_per_epoch)
        start = state["batch_in_epoch"] if epoch == state["epoch"] else 0
        for b in range(start, len(order)):
            name, index = order[b]
            model.train()
            batch = batch_for(model, experiment, data[(name, "train")], index, True).to(device)
            terms, probs = train_step(model, batch, experiment, tasks, plan.loss_divisor(epoch, b), cfg.amp, scaler,
                                      pos_weight, return_probs=True)
            training_log.add_batch(terms, optimizer.param_groups[0]["lr"])
            running.add(name, index, probs)
            state["step"] += 1
            bar.update(1)
            fault_point("after_batch")
            if plan.steps_after(epoch, b):  # the gradients since the last step, however many epochs they span
                optimizer_step(model, optimizer, cfg.clip_norm, scaler)
                scheduler.step()
                training_log.end_window(state["step"], epoch)
            if b + 1 in points:
                state["epoch"], state["batch_in_epoch"] = (epoch, b + 1) if b + 1 < len(order) else (epoch + 1, 0)
                state["evals"] += 1
                state["complete"] = state["epoch"] >= epochs
                full = cfg.train_scores == "full" and b + 1 == len(order)  # the epoch's last evaluation
                summary = record_evaluation(out, model, experiment, tasks, eval_splits, seed=cfg.seed, epoch=epoch,
                                            step=state["step"], best=state["best"], batch_size=cfg.eval_batch_size,
                                            device=device, amp=cfg.amp, running=None if full else running,
                                            best_weights=best_weights)
                training_log.scores(state["step"])  # also keeps the window in progress in `state`
                if b + 1 == len(order):
                    running = RunningPredictions()
                save_last(out, cfg, model, state, optimizer, scheduler, scaler, running, kept)
                log.info(summary)
                fault_point("after_eval")
                if stop_after_evals is not None and state["evals"] >= stop_after_evals and not state["complete"]:
                    bar.close()
                    training_log.close()
                    return out
    bar.close()
    training_log.close()
    if state["complete"]:
        config["provenance"]["finished"] = now()
        write_json(out / CONFIG_FILE, config)
    return out


def save_last(out: Path, cfg: TrainConfig, model, state: dict, optimizer, scheduler, scaler, running=None,
              kept: set[str] = frozenset({"last"})) -> None:
    """Save the `last` checkpoint: locally, copied into the run folder every `checkpoint_every` evaluations.

    The kept best checkpoints saved locally since the previous copy are copied
    first. A finished run is never resumed: its last checkpoint keeps the
    weights, not the optimiser's three slots per parameter and the pending
    gradients (a fifth of the size), and only when `kept` names it; otherwise
    `last/state.json` alone records the finished run. `running` (the epoch's training
    predictions so far, `evaluation.RunningPredictions`) travels with a resumable checkpoint.
    """
    extra = running.tensors() if running is not None else None
    run_checkpoints, local = out / "checkpoints", local_checkpoints_dir(out, cfg.local_dir)
    run_last, local_last = run_checkpoints / "last", local / "last"
    if state["complete"]:
        copy_kept_bests(local, run_checkpoints, kept)
        if "last" in kept:
            save_checkpoint(run_last, model, state, None, scheduler)
        else:
            save_state_only(run_last, model, state, scheduler)
        drop_unkept(run_checkpoints, kept, state)
        remove_local(local_last)
    elif cfg.checkpoint_every == 1:
        save_checkpoint(run_last, model, state, optimizer, scheduler, scaler, extra=extra)
    else:
        save_checkpoint(local_last, model, state, optimizer, scheduler, scaler, extra=extra)
        if state["evals"] % cfg.checkpoint_every == 0:
            copy_kept_bests(local, run_checkpoints, kept)  # first: a resume never finds a `last` newer than its bests
            copy_checkpoint(local_last, run_last)


def copy_kept_bests(local: Path, run_checkpoints: Path, kept: set[str]) -> None:
    """Copy into the run folder the kept local `best-<task>` checkpoints it does not hold yet
    (a new best since the last copy)."""
    for folder in sorted(local.glob("best-*")):
        if folder.name in kept:
            copy_if_changed(folder, run_checkpoints / folder.name)


def drop_unkept(run_checkpoints: Path, kept: set[str], state: dict) -> None:
    """At a run's end: delete best checkpoints it does not keep (written under another keep_weights);
    name kept ones missing."""
    for folder in sorted(run_checkpoints.glob("best-*")):
        if folder.name not in kept:
            shutil.rmtree(folder)
    missing = sorted(n for n in kept - {"last"} if n[len("best-"):] in state["best"]
                     and not (run_checkpoints / n / "weights.safetensors").exists())
    if missing:
        log.warning("%s: no weights for %s: the best evaluation came before keep_weights kept them",
                    run_checkpoints, ", ".join(missing))


def run_settings(experiment: Experiment, profile: Profile, cfg: TrainConfig, epochs: int | None = None) -> dict:
    """What decides a run's result, as config.json records it: experiment (recipe, switches), training, profile."""
    train = dataclasses.asdict(cfg)
    # recorded apart: where files go and which stay, not the run
    for where in ("checkpoint_every", "local_dir", "keep_weights", "local_store"):
        train.pop(where)
    train["epochs"] = epochs or cfg.epochs or experiment.epochs
    return json.loads(json.dumps({"experiment": dataclasses.asdict(experiment), "train": train,
                                  "profile": dataclasses.asdict(profile)}))


def training_store(features_root, cfg: TrainConfig) -> Path:
    """The store a run reads: `features_root` itself, or its verified local copy (`TrainConfig.local_store`)."""
    from .colab import on_colab
    from .store import local_copy

    if cfg.local_store or (cfg.local_store is None and on_colab()):
        return local_copy(features_root, cfg.local_dir)
    return Path(features_root)


def check_store_profile(store, profile: Profile, features_root) -> None:
    """Refuse a feature store extracted with another profile or other weights, naming both."""
    from .weights import provenance

    built = store.manifest.get("profile") or None
    if built and built != profile.name:
        raise MamikitError(f"{features_root}: the feature store was built with the {built} profile; "
                           f"this run asks for the {profile.name} profile (use a store extracted with it)")
    for name, spec in store.manifest.get("backbones", {}).items():
        recorded, wanted = spec.get("weights"), provenance(profile, name)
        random_recorded, random_wanted = str(recorded).startswith("random"), str(wanted).startswith("random")
        # pretrained names: extract checks
        if random_recorded != random_wanted or (random_recorded and recorded != wanted):
            raise MamikitError(f"{features_root}: {name} features were extracted with weights {recorded!r}; "
                               f"this run asks for {wanted!r} (--weights {profile.weights})")
