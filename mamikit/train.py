"""The training loop of section 4: multi-task batches, MADGRAD, accumulation, evaluation schedule.

One explicit loop (`train`): batches drawn per algorithm 1, the loss of
equations 5-6 (`train_step`), gradients accumulated over 20 batches, clipped at
norm 0.5, MADGRAD with a linear warm-up schedule, and evaluations several times
per epoch on train, dev and test. What an evaluation writes -- log rows,
predictions, answer files -- is `mamikit.evaluation`'s; the loop saves its own
state in the `last` checkpoint (safetensors weights plus JSON) and the best
checkpoints after it, so `resume=True` continues a killed run exactly where its
last evaluation left it, and decides where checkpoints go, when the local `last`
is copied into the run folder (`checkpoint_every` evaluations or
`checkpoint_minutes`) and which weights a finished run keeps
(`TrainConfig.keep_weights`, docs/checkpoints.md "Checkpoints on Drive").

A resume from a `last` checkpoint rolls the run folder back to that
checkpoint: log rows and TensorBoard steps after its step are dropped, the
predictions and answer files it carries are written back, and best checkpoints
written after it are deleted (`mamikit.checkpoints` says how), so that a run
resumed from the run folder's older copy after a lost machine keeps nothing of
the evaluations it redoes.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import __version__
from .batching import epoch_batches
from .checkpoints import (FILE_KEY, STAGED, checkpoint_state, copy_checkpoint, discard_after, kept_checkpoints,
                          load_checkpoint, local_checkpoints_dir, local_last_dir, newest_checkpoint, remove_local,
                          restore_run_files, run_files, save_checkpoint, save_new_bests, save_state_only,
                          settle_staged, stage_bests)
from .evaluation import RunningPredictions, autocast, batch_for, record_evaluation
from .experiments import Experiment, experiment_tasks, get_experiment
from .losses import dataset_loss, label_pos_weights
from .model import Batch, MamiModel, param_groups
from .optim import MADGRAD, clip_coefficient
from .profiles import Profile, for_experiment, get_profile
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
    return train_steps(model, batch, [len(batch.ids)], experiment, tasks, window, amp, scaler, pos_weight,
                       return_probs)[0]


def train_steps(model: MamiModel, batch: Batch, sizes: list[int], experiment: Experiment, tasks, window: int = 1,
                amp: bool = False, scaler=None, pos_weight: dict | None = None, return_probs: bool = False) -> list:
    """`train_step` of several micro-batches of one dataset at once: one forward and one backward pass.

    `batch` holds the micro-batches' memes one after another, ``sizes[i]`` of
    them for micro-batch i (`TrainConfig.merge_batches`). The model runs once
    over all of them: a meme's outputs depend on its own inputs only, so they
    are those of its micro-batch run alone, up to float rounding and dropout's
    draws (one mask over the merged batch). Each micro-batch's loss is then
    computed on its own rows (`split_output`), its pairs of eq. 2-4 within
    it, and divided by `window`; their sum is differentiated once, which
    gives the gradients the micro-batches would have added up one by one.
    On a GPU, where a step of 16 memes is bound by launching its operators,
    the merged pass launches those of one step for all of them.

    Returns:
        Per micro-batch, in order, what `train_step` returns for it.
    """
    loss, terms, output = merged_loss(model, batch, sizes, experiment, tasks, window, amp, pos_weight)
    (scaler.scale(loss) if scaler else loss).backward()
    if not return_probs:
        return terms
    probs = {task: torch.sigmoid(logits.detach().float()) for task, logits in output.logits.items()}
    if len(sizes) > 1:
        cut = {task: p.split(sizes) for task, p in probs.items()}
        return [(t, {task: cut[task][i] for task in cut}) for i, t in enumerate(terms)]
    return [(terms[0], probs)]


def merged_loss(model: MamiModel, batch: Batch, sizes: list[int], experiment: Experiment, tasks, window: int = 1,
                amp: bool = False, pos_weight: dict | None = None) -> tuple:
    """The forward half of `train_steps`: (the sum of the micro-batches' losses / `window`, their detached terms,
    the model's output)."""
    with autocast(batch.device, amp):
        output = model(batch)
        own = [t for t in tasks if t.dataset == batch.dataset]
        losses, terms = [], []
        for part, rows in zip(micro_batches(batch, sizes), split_output(output, sizes)):
            loss, parts = dataset_loss(rows, part, own, experiment.proj_align, experiment.contrastive,
                                       pos_weight=pos_weight, align_all_pairs=experiment.align_all_pairs,
                                       contrastive_as_coded=experiment.contrastive_as_coded,
                                       query_align=experiment.query_align)
            losses.append(loss)
            terms.append(parts)
    return (losses[0] if len(losses) == 1 else torch.stack(losses).sum()) / window, terms, output


# How TorchDynamo traces the training step (`compiled_step`): the real-token gather's data-dependent size in the graph.
DYNAMO_CONFIG = {"capture_dynamic_output_shape_ops": True}
# and its symbolic sizes: two sizes that happen to be equal in the first batch traced (CLIP's 5 vectors and the
# DETR tokens kept, a label count and the longest text) stay two symbols, not one that a later batch recompiles.
SHAPE_CONFIG = {"use_duck_shape": False}


def compiled_step(model: MamiModel, backend: str = "inductor"):
    """`model` compiled by ``torch.compile`` for the training step (`TrainConfig.compile`): the callable that
    `train_steps` runs in its place; weights, state dict and evaluation stay the eager module's.

    Shapes are dynamic (a packed batch's token counts change from batch to
    batch), so a dataset's step compiles once; the packed encoders' gather of
    real tokens (``nonzero``, a data-dependent size) is traced into the graph
    rather than splitting it. The forward pass, and through AOTAutograd its
    backward pass, become one graph each, whose pointwise operators inductor
    fuses into a few kernels. Dropout draws its masks from inductor's own
    generator, seeded from PyTorch's: the same run on every resume, not the
    eager step's masks. `backend`: ``torch.compile``'s (tests use "aot_eager").
    """
    from torch.fx.experimental import _config as shape_config

    for name, value in DYNAMO_CONFIG.items():
        setattr(torch._dynamo.config, name, value)
    for name, value in SHAPE_CONFIG.items():
        setattr(shape_config, name, value)
    # The decoder's per-dataset index tensors made before tracing: a graph traced while they were still to be
    # made would be traced again once they exist, one more compile per dataset.
    device = next(model.parameters()).device
    for dataset in dict.fromkeys(task.dataset for task in model.cfg.tasks):
        model._row_plan(dataset, device)
    return torch.compile(model, dynamic=True, backend=backend)


def micro_batches(batch: Batch, sizes: list[int]) -> list[Batch]:
    """A merged batch cut back into its micro-batches of ``sizes[i]`` memes each (tensors as views)."""
    if len(sizes) == 1:
        return [batch]
    fields = {f.name: getattr(batch, f.name) for f in dataclasses.fields(batch)}
    cut = {k: v.split(sizes) for k, v in fields.items() if torch.is_tensor(v)}
    ends = np.cumsum(sizes)
    return [dataclasses.replace(batch, ids=batch.ids[end - n:end], **{k: v[i] for k, v in cut.items()})
            for i, (n, end) in enumerate(zip(sizes, ends))]


def split_output(output, sizes: list[int]) -> list:
    """A `ModelOutput` of a merged batch cut into its micro-batches' rows, ``sizes[i]`` each (views).

    One ``split`` per tensor (one operator, whose backward is one too); what
    is not per meme (the class queries) is shared.
    """
    if len(sizes) == 1:
        return [output]
    n = len(sizes)

    def cut(t):
        return [None] * n if t is None else t.split(sizes)

    logits = {k: cut(v) for k, v in output.logits.items()}
    mlp = {k: [cut(h) for h in v] for k, v in output.mlp_inputs.items()}
    proj = {k: (cut(f), cut(g)) for k, (f, g) in output.projections.items()}
    decoder, memory = cut(output.decoder_out), cut(output.memory_mask)
    self_attn = [cut(a) for a in output.self_attn] if output.self_attn is not None else None
    cross_attn = [cut(a) for a in output.cross_attn] if output.cross_attn is not None else None
    return [dataclasses.replace(
        output, logits={k: v[i] for k, v in logits.items()}, mlp_inputs={k: [h[i] for h in v] for k, v in mlp.items()},
        projections={k: (f[i], g[i]) for k, (f, g) in proj.items()}, decoder_out=decoder[i], memory_mask=memory[i],
        self_attn=None if self_attn is None else [a[i] for a in self_attn],
        cross_attn=None if cross_attn is None else [a[i] for a in cross_attn]) for i in range(n)]


def merge_groups(plan: StepPlan, epoch: int, start: int, order: list, points: set[int], merge: bool
                 ) -> list[list[int]]:
    """The batches from `start` up to the next window end, evaluation point or epoch end, grouped by dataset.

    Each group (batch positions in `order`, ascending) runs as one merged
    forward pass (`train_steps`); with `merge` False every batch is a group of
    its own. A segment never crosses a window's end, so the optimiser steps
    after all of a window's batches, nor an evaluation point: a checkpoint
    (saved at evaluations) falls between segments, and a resumed run forms
    the same segments as an uninterrupted one.
    """
    end = start + 1
    while merge and end < len(order) and not plan.steps_after(epoch, end - 1) and end not in points:
        end += 1
    groups: dict[str, list[int]] = {}
    for b in range(start, end):
        groups.setdefault(order[b][0], []).append(b)
    return list(groups.values())


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
        features_root: the features root (one store per profile, `store.store_dir`) or a store folder.
        out_dir: the run directory.
        profile: profile name or Profile (must match the store's backbones); an experiment that names a
            profile trains with that one instead (`profiles.for_experiment`).
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

    from .store import FeatureStore, store_dir

    experiment = get_experiment(experiment) if isinstance(experiment, str) else experiment
    profile = run_profile(experiment, profile)
    cfg = train_cfg or TrainConfig()
    epochs = cfg.epochs or experiment.epochs
    out = Path(out_dir)
    device = pick_device(cfg.device)
    features_root = store_dir(features_root, profile.name)  # the profile's own store under the root
    store = FeatureStore(training_store(features_root, cfg))
    check_store_profile(store, profile, features_root)
    check_store_encoders(store, experiment, features_root)
    tasks = experiment_tasks(experiment)
    config = {
        **run_settings(experiment, profile, cfg, epochs),
        # where checkpoints go and which stay, not what the run is: free to change on resume
        "checkpoints": {"every": cfg.checkpoint_every, "minutes": cfg.checkpoint_minutes, "local_dir": cfg.local_dir,
                        "keep_weights": cfg.keep_weights},
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
        clear_run_files(out)  # and what an attempt killed before its first checkpoint wrote
    if cfg.amp and device.type != "cuda":
        log.warning("--amp: mixed precision needs CUDA; training on %s in float32", device)
    if profile.name == "paper" and device.type == "cpu":
        log.warning("training the paper profile on the CPU: expect days per run; a GPU runtime is the intended place")

    kept = kept_checkpoints(cfg.keep_weights, [t.name for t in tasks])
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
    step_model = compiled_step(model) if cfg.compile else model
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
    copies = CopySchedule(cfg.checkpoint_every, cfg.checkpoint_minutes)
    if resume:
        extra = {}
        state = load_checkpoint(source, model, optimizer, scaler, extra=extra)
        running = RunningPredictions({k: v for k, v in extra.items() if not k.startswith(FILE_KEY)}, device)
        scheduler.last_epoch = state["scheduler_last_epoch"]
        lrs = [base * lam(scheduler.last_epoch) for base, lam in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
        for g, lr in zip(optimizer.param_groups, lrs):
            g["lr"] = lr
        scheduler._last_lr = lrs  # noqa: SLF001
        if state.get("complete"):
            outcome["mode"] = "complete"
            log.info("%s: already complete", out)
            return out
        roll_back(out, local_last.parent, state, {k: v for k, v in extra.items() if k.startswith(FILE_KEY)}, source)
        copies.evals = int((checkpoint_state(run_last) or {}).get("evals", 0))  # the run folder's copy
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
        done = {}  # batch position -> (loss terms, probabilities), computed a group at a time
        for b in range(start, len(order)):
            name, index = order[b]
            if b not in done:
                model.train()
                for group in merge_groups(plan, epoch, b, order, points, cfg.merge_batches):
                    merged = np.concatenate([order[g][1] for g in group])
                    batch = batch_for(model, experiment, data[(order[group[0]][0], "train")], merged, True).to(device)
                    results = train_steps(step_model, batch, [len(order[g][1]) for g in group], experiment, tasks,
                                          plan.loss_divisor(epoch, b), cfg.amp, scaler, pos_weight, return_probs=True)
                    done.update(zip(group, results))
            terms, probs = done.pop(b)
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
                # best checkpoints are saved with `last` (save_last), not before it
                summary = record_evaluation(out, model, experiment, tasks, eval_splits, seed=cfg.seed, epoch=epoch,
                                            step=state["step"], best=state["best"], batch_size=cfg.eval_batch_size,
                                            device=device, amp=cfg.amp, running=None if full else running,
                                            best_weights={})
                training_log.scores(state["step"])  # also keeps the window in progress in `state`
                if b + 1 == len(order):
                    running = RunningPredictions()
                copy = copies.due(state["evals"])
                save_last(out, cfg, model, state, optimizer, scheduler, scaler, running, kept, copy)
                if copy:
                    copies.copied(state["evals"])
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


@dataclass
class CopySchedule:
    """When the local `last` checkpoint is next copied into the run folder: once `every` evaluations or
    `minutes` of wall-clock time have passed since the previous copy (TrainConfig.checkpoint_every,
    checkpoint_minutes), at the evaluation that finds it so."""

    every: int  # evaluations between copies
    minutes: float | None  # wall-clock minutes after which the next evaluation copies; None: evaluations only
    evals: int = 0  # the evaluation count of the previous copy
    since: float = field(default_factory=time.monotonic)  # when it was made (or this process started)

    def due(self, evals: int) -> bool:
        """Whether the evaluation that makes the count `evals` copies."""
        late = self.minutes is not None and time.monotonic() - self.since >= 60 * self.minutes
        return evals - self.evals >= self.every or late

    def copied(self, evals: int) -> None:
        """A copy was made at evaluation count `evals`."""
        self.evals, self.since = evals, time.monotonic()


def save_last(out: Path, cfg: TrainConfig, model, state: dict, optimizer, scheduler, scaler, running=None,
              kept: set[str] = frozenset({"last"}), copy: bool = False) -> None:
    """Save the `last` checkpoint and this evaluation's new best checkpoints; copy them into the run folder
    when `copy` (`CopySchedule.due`) or when the run is finished.

    `last` goes to local disk, or straight into the run folder with
    `checkpoint_every` 1. A best checkpoint the run keeps is staged beside it
    before it, and moved into place after it (`checkpoints.settle_staged`);
    a copy stages the kept bests the run folder lacks, copies `last`, then
    moves them into place: a resume never finds a best that its `last` does
    not record. A resumable `last` also carries the run folder's predictions
    and answer files (`checkpoints.run_files`) and `running` (the epoch's
    training predictions so far, `evaluation.RunningPredictions`). A finished
    run is never resumed: its last checkpoint keeps the weights, not the
    optimiser's three slots per parameter and the pending gradients (a fifth of
    the size), and only when `kept` names it; otherwise `last/state.json`
    alone records the finished run.
    """
    run_checkpoints, local = out / "checkpoints", local_checkpoints_dir(out, cfg.local_dir)
    here = run_checkpoints if cfg.checkpoint_every == 1 else local  # where `last` is saved
    save_new_bests(here, model, state, kept)
    if state["complete"]:
        if here != run_checkpoints:
            stage_bests(local, run_checkpoints, kept)
        if "last" in kept:
            save_checkpoint(run_checkpoints / "last", model, state, None, scheduler)
        else:
            save_state_only(run_checkpoints / "last", model, state, scheduler)
        settle_staged(run_checkpoints)
        drop_unkept(run_checkpoints, kept, state)
        remove_local(local / "last")
        return
    extra = (running.tensors() if running is not None else {}) | run_files(out)
    save_checkpoint(here / "last", model, state, optimizer, scheduler, scaler, extra=extra)
    settle_staged(here)
    if copy and here != run_checkpoints:
        stage_bests(local, run_checkpoints, kept)
        fault_point("before_copy")  # bests staged in the run folder, `last` not copied yet
        copy_checkpoint(local / "last", run_checkpoints / "last")
        settle_staged(run_checkpoints)
        log.info("%s: checkpoint of evaluation %d copied into the run folder", out, state["evals"])


def roll_back(out: Path, local: Path, state: dict, files: dict, source: Path) -> None:
    """Return the run folder to the `last` checkpoint a run resumes from (`state`, read from `source`).

    Best checkpoints staged for it are moved into place and those written
    after it (by the evaluations the resume redoes) deleted, locally and in
    the run folder; log rows after its step are dropped; the predictions and
    answer files it carries (`files`, `checkpoints.run_files`) are written
    back. TensorBoard drops its later steps itself (`runlog.TrainingLog`).
    """
    run_checkpoints = out / "checkpoints"
    for folder in (local, run_checkpoints):
        settle_staged(folder)
        discard_after(folder.glob("best-*"), state["step"])
    truncate_log(out, state["step"])
    if files:  # checkpoints written before `last` carried them have none: the next evaluations redo them
        changed = restore_run_files(out, files, source)
        if changed:
            log.info("%s: %d prediction and answer files returned to step %d", out, changed, state["step"])


def clear_run_files(out: Path) -> None:
    """Before a run starts over: delete the predictions, answers and best checkpoints of an earlier attempt
    (killed before its first checkpoint)."""
    restore_run_files(out, {}, out)
    shutil.rmtree(out / "checkpoints" / STAGED, ignore_errors=True)
    discard_after((out / "checkpoints").glob("best-*"), -1)


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


def run_profile(experiment: Experiment, profile: Profile | str) -> Profile:
    """The profile a run trains with: the experiment's own when it names one (`profiles.for_experiment`)."""
    profile = get_profile(profile) if isinstance(profile, str) else profile
    return for_experiment(profile, experiment.profile)


def run_settings(experiment: Experiment, profile: Profile, cfg: TrainConfig, epochs: int | None = None) -> dict:
    """What decides a run's result, as config.json records it: experiment (recipe, switches), training, profile."""
    profile = run_profile(experiment, profile)
    train = dataclasses.asdict(cfg)
    # recorded apart: where files go and which stay, not the run
    for where in ("checkpoint_every", "checkpoint_minutes", "local_dir", "keep_weights", "local_store"):
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


def check_store_encoders(store, experiment: Experiment, features_root) -> None:
    """Refuse an experiment that uses DETR on a store of a profile with detector none."""
    if "detr" in experiment.image_encoders and not store.has_detector:
        raise MamikitError(f"{features_root}: the feature store of the {store.profile_name} profile holds no DETR "
                           f"features (detector none); experiment {experiment.name} uses DETR (image_encoders "
                           f"{', '.join(experiment.image_encoders)}): train one with image_encoders ('clip',) "
                           "such as 20, or a profile with a detector")
