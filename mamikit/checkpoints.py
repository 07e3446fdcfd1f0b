"""Checkpoints: safetensors weights plus JSON state, written and checked as one file (section 4's resumable training).

A checkpoint holds the trainable weights, and for the `last` checkpoint of an
unfinished run also the optimiser state, the pending accumulated gradients, the
random-number states (CPU and every CUDA device) and the mixed-precision
GradScaler's state. The training state travels inside the weights file's
metadata with a SHA-256 of the tensors, so weights and state are replaced
together by one rename and a damaged file is recognised; `state.json` beside it
is a readable copy. Nothing is ever unpickled.

While a run trains, its resumable `last` checkpoint and the best-dev
checkpoints it keeps live on local disk (:func:`local_checkpoints_dir`) and are
copied into the run folder every few evaluations or minutes
(:func:`copy_checkpoint`): a run folder on Google Drive then receives a few
large writes per run instead of one per evaluation or new best. A finished run
keeps only the weights its `keep_weights` names (:func:`kept_checkpoints`);
its `last/state.json` always stays, the record that the run is finished.

A resume continues from a `last` checkpoint, and everything written after it
belongs to a timeline that is thrown away (on a GPU the evaluations redone
need not repeat bit for bit). So that none of it survives:

- `last` carries the run folder's small per-evaluation files as they were when
  it was saved: `predictions/` (last and best-<task>) and `answer/` (last and
  best) travel inside its weights file, under the same checksum
  (:func:`run_files`), and a resume rewrites them from it
  (:func:`restore_run_files`).
- A best checkpoint is never put in place before the `last` that records it:
  it is written (or copied) into `.staged/` beside that `last`, then `last`,
  then it is moved into place (:func:`stage_bests`, :func:`settle_staged`).
  A kill in between leaves it staged; the next resume moves it into place when
  the `last` found there records it as its task's best, and deletes it
  otherwise.
- The training loop drops the log rows and TensorBoard steps after the
  resumed step (`runs.truncate_log`, `runlog.TrainingLog`).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from pathlib import Path

import torch

from . import __version__
from .model import MamiModel
from .registry import official_task_names
from .settings import KEEP_WEIGHTS, check_keep_weights
from .utils import LOCAL_ENV, local_root  # noqa: F401  (the local folder of checkpoints; part of this module's API)
from .utils import MamikitError, atomic_write, fault_point, get_logger, read_json, write_json

log = get_logger(__name__)


def _cfg_dict(model: MamiModel) -> dict:
    """The model configuration as plain JSON values, to recognise a checkpoint's (``ModelConfig.record``)."""
    return model.cfg.record()


def _trainable_state(model: MamiModel) -> dict[str, torch.Tensor]:
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    out, storages = {}, set()
    for k, v in model.state_dict().items():
        if k in names:
            v = v.detach().cpu().contiguous()
            storage = v.untyped_storage().data_ptr()
            # Parameters over one storage (tied_text_embeddings) are written as copies: safetensors refuses
            # shared memory.
            out[k] = v.clone() if storage in storages else v
            storages.add(storage)
    return out


def _tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over names, dtypes, shapes and bytes: a checkpoint damaged after writing is recognised."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())  # hashed in place, no copy
    return h.hexdigest()


CHECKPOINT_FORMAT = "mamikit-checkpoint/1"
CUDA_RNG = "__rng__.cuda"  # + device number: each CUDA generator's state in a resumable checkpoint
STATE_KEYS = ("epoch", "batch_in_epoch", "step", "evals", "best", "complete", "scheduler_last_epoch")


def save_checkpoint(folder: Path, model: MamiModel, state: dict, optimizer=None, scheduler=None, scaler=None,
                    extra=None) -> None:
    """Weights (and optimiser tensors, pending gradients, RNG, GradScaler, `extra` tensors) as safetensors + JSON
    state.

    The state also travels inside the weights file's metadata, so weights and
    state are replaced together in one rename; `state.json` is its readable copy.
    `extra` ({name: tensor}, e.g. the loop's running predictions) is saved
    with them and comes back through `load_checkpoint(..., extra=)`.
    """
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    tensors = _trainable_state(model)
    if optimizer is not None:
        names = {id(p): n for n, p in model.named_parameters()}
        for key, st in optimizer.state.items():
            if isinstance(key, str):  # MADGRAD keeps its step counter `k` here
                tensors[f"__optim__.{key}"] = st.detach().cpu().contiguous()
                continue
            for slot, value in st.items():
                if torch.is_tensor(value):
                    tensors[f"__optim__.{names[id(key)]}.{slot}"] = value.detach().cpu().contiguous()
        for n, p in model.named_parameters():
            if p.grad is not None:  # mid-window accumulated gradients
                tensors[f"__grad__.{n}"] = p.grad.detach().cpu().contiguous()
        tensors["__rng__.torch"] = torch.get_rng_state()
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            # dropout on a GPU draws from the CUDA generators: resume continues their streams
            for i, rng in enumerate(torch.cuda.get_rng_state_all()):
                tensors[f"{CUDA_RNG}{i}"] = rng
    tensors.update({f"__extra__.{k}": v.detach().cpu().contiguous() for k, v in (extra or {}).items()})
    state = _full_state(model, state, scheduler, scaler if optimizer is not None else None)
    # one metadata key: safetensors writes several in random order, and checkpoints must be byte-reproducible
    meta = {"format": CHECKPOINT_FORMAT, "sha256": _tensors_digest(tensors), "state": state}
    tmp = folder / f".weights.safetensors.{os.getpid()}.tmp"  # streamed to disk, then synced and renamed
    try:
        save_file(tensors, str(tmp), metadata={"mamikit": json.dumps(meta)})
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        fault_point("before_rename")
        os.replace(tmp, folder / "weights.safetensors")
    finally:
        tmp.unlink(missing_ok=True)
    # weights written, state.json not yet
    fault_point("mid_checkpoint" if optimizer is not None else "mid_best_checkpoint")
    write_json(folder / "state.json", state)


def _full_state(model: MamiModel, state: dict, scheduler=None, scaler=None) -> dict:
    """The state a checkpoint records: the loop's, the schedule's position, the GradScaler's, version and model
    configuration."""
    if scheduler is not None:
        state = dict(state, scheduler_last_epoch=scheduler.last_epoch)
    if scaler is not None:
        state = dict(state, scaler=_scaler_state(scaler))
    return dict(state, mamikit_version=__version__, config=_cfg_dict(model))


def save_state_only(folder: Path, model: MamiModel, state: dict, scheduler=None) -> None:
    """A finished run's `last` record without weights: state.json, then the weights file there removed.

    In this order a kill in between leaves a finished state.json beside the
    resumable weights it replaces; :func:`check_finished` removes those later.
    """
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / "state.json", _full_state(model, state, scheduler))
    (folder / "weights.safetensors").unlink(missing_ok=True)


def _read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict | None]:
    """Tensors and embedded state of a weights file; MamikitError naming it if truncated, corrupt or altered."""
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise MamikitError(f"{path}: file not found")
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 (safe_open has no iterator)
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise MamikitError(f"{path}: unreadable checkpoint "
                           f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
    if "mamikit" not in meta:
        return tensors, None  # written by an older mamikit: the state lives in state.json only
    try:
        info = json.loads(meta["mamikit"])
        digest, state = info["sha256"], info["state"]
    except (ValueError, KeyError, TypeError):
        raise MamikitError(f"{path}: checkpoint metadata is damaged") from None
    if _tensors_digest(tensors) != digest:
        raise MamikitError(f"{path}: checkpoint is corrupt (its contents do not match the checksum written with it)")
    return tensors, state


def _checkpoint_state(folder: Path, embedded: dict | None) -> dict:
    """The checkpoint's state: the copy inside the weights file wins; a stale or damaged state.json is rewritten."""
    path = folder / "state.json"
    try:
        on_disk = read_json(path)
    except MamikitError as exc:
        if embedded is None:
            raise
        on_disk, problem = None, str(exc)
    else:
        problem = f"{path}: out of date (the process was killed while saving)"
    if embedded is None:
        return on_disk
    if on_disk != embedded:
        log.warning("%s; restored from %s", problem, folder / "weights.safetensors")
        write_json(path, embedded)
    return embedded


def _scaler_state(scaler) -> dict:
    """The GradScaler's state as JSON values (its scale is a one-element tensor on the GPU)."""
    return {k: (v.item() if torch.is_tensor(v) else v) for k, v in scaler.state_dict().items()}


def load_checkpoint(folder: Path, model: MamiModel, optimizer=None, scaler=None, extra: dict | None = None) -> dict:
    """Load a checkpoint saved by `save_checkpoint`; refuse one from another configuration.

    With `optimizer`, also the optimiser tensors, pending gradients and random
    states; with `scaler`, the GradScaler's state when the checkpoint has one.
    `extra`, a dict, receives the tensors saved as `save_checkpoint`'s `extra` (none from older checkpoints).
    """
    path = folder / "weights.safetensors"
    tensors, embedded = _read_checkpoint(path)
    state = _checkpoint_state(folder, embedded)
    where = path if embedded is not None else folder / "state.json"
    if not isinstance(state, dict) or "config" not in state:
        raise MamikitError(f"{where}: not a mamikit checkpoint state (no model configuration)")
    saved = dict(state.get("config") or {})
    if "backbones" in saved:  # checkpoints written before the field was named image_encoders
        saved.setdefault("image_encoders", saved.pop("backbones"))
    if saved != _cfg_dict(model):
        raise MamikitError(f"{path}: checkpoint was saved by another model configuration")
    weights = {k: v for k, v in tensors.items() if not k.startswith("__")}
    expected = _trainable_state(model)
    bad = sorted(set(expected) ^ set(weights)) + [k for k in expected
                                                  if k in weights and expected[k].shape != weights[k].shape]
    if bad:
        raise MamikitError(f"{path}: checkpoint does not match the model (e.g. {bad[0]})")
    model.load_state_dict(weights, strict=False)
    if extra is not None:
        extra.update({k[len("__extra__."):]: v for k, v in tensors.items() if k.startswith("__extra__.")})
    if optimizer is not None:
        missing = [k for k in STATE_KEYS if k not in state]
        if missing:
            raise MamikitError(f"{where}: not a training checkpoint (no {', '.join(missing)})")
        params = dict(model.named_parameters())
        try:
            for key, value in tensors.items():
                if key.startswith("__optim__."):
                    name = key[len("__optim__."):]
                    if "." not in name:
                        optimizer.state[name] = value
                        continue
                    name, slot = name.rsplit(".", 1)
                    optimizer.state[params[name]][slot] = value.to(params[name].device)
                elif key.startswith("__grad__."):
                    p = params[key[len("__grad__."):]]
                    p.grad = value.to(p.device)
        except KeyError as exc:
            raise MamikitError(f"{path}: optimiser state for unknown parameter {exc}") from None
        if "__rng__.torch" in tensors:
            torch.set_rng_state(tensors["__rng__.torch"])
        cuda_keys = sorted((k for k in tensors if k.startswith(CUDA_RNG)), key=lambda k: int(k[len(CUDA_RNG):]))
        cuda = [tensors[k] for k in cuda_keys]  # by device number
        if cuda and torch.cuda.is_available():
            if len(cuda) != torch.cuda.device_count():
                log.warning("%s: saved with %d CUDA devices, resumed with %d; their random streams start afresh",
                            path, len(cuda), torch.cuda.device_count())
            else:
                torch.cuda.set_rng_state_all(cuda)
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
    return state


# ----------------------------------------------------------------------------- where the `last` checkpoint lives



def local_checkpoints_dir(run_dir, local_dir: str | None = None) -> Path:
    """The local folder of a run's checkpoints while it trains: `<local>/mamikit-<hash of the run path>`.

    `local_dir` (TrainConfig.local_dir) or $MAMIKIT_LOCAL or the temp folder; the hash of the
    resolved run path keeps runs apart and lets a resumed process on the same machine find it.
    It holds `last` (resumable) and the `best-<task>` checkpoints the run keeps.
    """
    root = local_root(local_dir)
    key = hashlib.sha1(str(Path(run_dir).resolve()).encode()).hexdigest()[:16]
    return root / f"mamikit-{key}"


def local_last_dir(run_dir, local_dir: str | None = None) -> Path:
    """The local folder of a run's resumable `last` checkpoint: `local_checkpoints_dir(...)/last`."""
    return local_checkpoints_dir(run_dir, local_dir) / "last"


def checkpoint_state(folder: Path) -> dict | None:
    """The state a checkpoint folder holds: its weights file's (what loading uses), else state.json; None if none.

    The weights file's copy comes first: a kill between the rename of the
    weights and the write of state.json leaves state.json a step behind.
    Only the header is read.
    """
    from safetensors import safe_open

    try:
        with safe_open(str(folder / "weights.safetensors"), framework="pt") as fh:
            state = json.loads((fh.metadata() or {})["mamikit"])["state"]
        if isinstance(state, dict):
            return state
    except Exception:  # noqa: BLE001 -- absent, older or damaged: state.json may still say
        pass
    try:
        state = read_json(folder / "state.json")
    except MamikitError:
        return None
    return state if isinstance(state, dict) else None


def checkpoint_step(folder: Path) -> int | None:
    """The training step a checkpoint folder holds (`checkpoint_state`'s); None if none."""
    try:
        return int(checkpoint_state(folder)["step"])
    except (KeyError, TypeError, ValueError):
        return None


def newest_checkpoint(*folders: Path) -> Path | None:
    """Of several copies of a `last` checkpoint, the one furthest into training (the first on a tie)."""
    steps = [(checkpoint_step(f), i, f) for i, f in enumerate(folders)]
    found = [(step, -i, f) for step, i, f in steps if step is not None]
    return max(found)[2] if found else None


def copy_checkpoint(src: Path, dst: Path) -> int:
    """Copy a checkpoint folder (weights, then state.json) file by file, each atomically; returns the bytes written."""
    dst.mkdir(parents=True, exist_ok=True)
    written = 0
    for name in ("weights.safetensors", "state.json"):
        tmp = dst / f".{name}.{os.getpid()}.tmp"
        try:
            shutil.copyfile(src / name, tmp)
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp, dst / name)
        finally:
            tmp.unlink(missing_ok=True)
        written += (dst / name).stat().st_size
    return written


def discard_after(folders, step: int) -> None:
    """Delete those checkpoint folders saved after `step` (or unreadable): a resume from `step` redoes those
    evaluations."""
    for folder in folders:
        saved = checkpoint_step(folder)
        if saved is None or saved > step:
            shutil.rmtree(folder, ignore_errors=True)


# ----------------------------------------------------------------------------- best checkpoints, after their `last`

STAGED = ".staged"  # <checkpoints>/.staged/best-<task>: best checkpoints waiting for the `last` that records them


def save_new_bests(checkpoints_dir: Path, model: MamiModel, state: dict, kept) -> None:
    """Stage the best checkpoints of this evaluation's new best dev scores (tasks whose best step is now),
    those `kept` names, in `checkpoints_dir/.staged`."""
    for task, best in sorted(state["best"].items()):
        if best["step"] == state["step"] and f"best-{task}" in kept:
            save_checkpoint(checkpoints_dir / STAGED / f"best-{task}", model,
                            {"task": task, "step": best["step"], "epoch": best["epoch"], "dev_score": best["dev"]})


def stage_bests(local: Path, run_checkpoints: Path, kept) -> int:
    """Copy into `run_checkpoints/.staged` the kept best checkpoints of `local` (staged or in place) that differ
    from the run folder's; returns the bytes written."""
    written = 0
    for name in sorted(n for n in kept if n != "last"):
        src = next((f for f in (local / STAGED / name, local / name) if (f / "weights.safetensors").exists()), None)
        if src is not None and checkpoint_step(src) != checkpoint_step(run_checkpoints / name):
            written += copy_checkpoint(src, run_checkpoints / STAGED / name)
    return written


def settle_staged(checkpoints_dir: Path) -> None:
    """Move each staged best checkpoint into place if the `last` beside it records it (its task's best step),
    and delete the others: they belong to evaluations that `last` does not hold."""
    staged = checkpoints_dir / STAGED
    if not staged.is_dir():
        return
    best = (checkpoint_state(checkpoints_dir / "last") or {}).get("best") or {}
    for folder in sorted(staged.iterdir()):
        task = folder.name[len("best-"):]
        step = checkpoint_step(folder)
        if step is None or not isinstance(best.get(task), dict) or best[task].get("step") != step:
            continue
        target = checkpoints_dir / folder.name
        target.mkdir(exist_ok=True)
        for name in ("weights.safetensors", "state.json"):  # the weights first: they carry the state
            if (folder / name).exists():
                os.replace(folder / name, target / name)
    shutil.rmtree(staged, ignore_errors=True)


# ----------------------------------------------------------------------------- the small files `last` carries

SNAPSHOT_FOLDERS = ("predictions", "answer")  # the run folder's per-evaluation files that `last` carries
FILE_KEY = "file."  # the name prefix of a carried file among a checkpoint's `extra` tensors


def run_files(run_dir) -> dict[str, torch.Tensor]:
    """The run folder's predictions and answer files as uint8 tensors named `file.<path>`, for `last`'s extra."""
    root = Path(run_dir)
    out = {}
    for top in SNAPSHOT_FOLDERS:
        for path in sorted((root / top).rglob("*")):
            if path.is_file() and not (path.name.startswith(".") and path.name.endswith(".tmp")):
                data = bytearray(path.read_bytes())
                out[FILE_KEY + path.relative_to(root).as_posix()] = (torch.frombuffer(data, dtype=torch.uint8) if data
                                                                     else torch.zeros(0, dtype=torch.uint8))
    return out


def restore_run_files(run_dir, files: dict[str, torch.Tensor], source: Path) -> int:
    """Make the run folder's predictions and answer files those `run_files` took (from checkpoint `source`):
    files it did not hold are deleted, changed ones rewritten. Returns the number of files deleted or written."""
    root = Path(run_dir)
    wanted = {}
    for key, value in files.items():
        rel = key[len(FILE_KEY):]
        parts = Path(rel).parts
        if not parts or parts[0] not in SNAPSHOT_FOLDERS or ".." in parts or Path(rel).is_absolute():
            raise MamikitError(f"{source}: the checkpoint carries a file outside predictions/ and answer/ ({rel})")
        wanted[rel] = value.numpy().tobytes()
    changed = 0
    for top in SNAPSHOT_FOLDERS:
        for path in sorted((root / top).rglob("*"), reverse=True):  # a folder's files before the folder
            if path.is_file() and path.relative_to(root).as_posix() not in wanted:
                path.unlink()
                changed += 1
            elif path.is_dir() and not any(path.iterdir()):
                path.rmdir()
    for rel, data in sorted(wanted.items()):
        path = root / rel
        if not path.is_file() or path.read_bytes() != data:
            with atomic_write(path, "wb") as fh:
                fh.write(data)
            changed += 1
    return changed


def remove_local(folder: Path) -> None:
    """Delete a run's local checkpoint folder (`local_last_dir`'s parent) once the run folder holds the run."""
    shutil.rmtree(folder.parent, ignore_errors=True)


def check_finished(checkpoints_dir: Path) -> None:
    """A finished run's kept weights are whole (checksums; MamikitError naming a damaged file).

    Resumable `last` weights beside a finished state.json (a finish killed
    before it removed them, :func:`save_state_only`) are removed, and best
    checkpoints staged for the finished `last` are moved into place (a finish
    killed before it did, :func:`settle_staged`).
    """
    checkpoints_dir = Path(checkpoints_dir)
    last = checkpoints_dir / "last" / "weights.safetensors"
    if last.exists():
        _, embedded = _read_checkpoint(last)
        if embedded is not None and not embedded.get("complete"):
            log.info("%s: resumable weights of a finished run, removed", last)
            last.unlink()
    settle_staged(checkpoints_dir)  # against the finished state, once the resumable one is gone
    for path in sorted(checkpoints_dir.glob("*/weights.safetensors")):
        if path != last:
            _read_checkpoint(path)


# ----------------------------------------------------------------------------- which weights a finished run keeps

def kept_checkpoints(keep_weights: str, task_names) -> set[str]:
    """The checkpoint folders whose weights a finished run with these tasks keeps.

    "best": `best-<official Task A>`, what `runs.load_run`, figures and predict load by
    default; "last": the final weights (what `init_from` starts from); "best+last": both;
    "all": `last` and every task's `best-<task>`.
    """
    check_keep_weights(keep_weights, "kept_checkpoints")
    official = official_task_names()[0]
    bests = {f"best-{t}" for t in task_names if keep_weights == "all" or (t == official and "best" in keep_weights)}
    return bests | ({"last"} if keep_weights != "best" else set())


def keeping(name: str) -> list[str]:
    """The keep_weights values under which a finished run keeps checkpoint `name` (`last` or `best-<task>`)."""
    tasks = [name[len("best-"):]] if name.startswith("best-") else []
    return [value for value in KEEP_WEIGHTS if name in kept_checkpoints(value, tasks)]


def checkpoint_bytes(model: MamiModel, optimizer_slots: int = 3, gradients: bool = True) -> dict[str, int]:
    """Bytes of a model's `weights` checkpoint and of its resumable `last` checkpoint (float32 tensors).

    The resumable one adds MADGRAD's `optimizer_slots` tensors per parameter
    (grad_sum_sq, s, x0) and the pending gradients of an accumulation window.
    """
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    weights = 4 * n
    return {"parameters": n, "weights": weights, "resumable": weights * (1 + optimizer_slots + int(gradients))}


def run_folder_bytes(weights: int, resumable: int, task_names, keep_weights: str = "best", evaluations: int = 105,
                     checkpoint_every: int = 35, eval_minutes: float | None = None,
                     checkpoint_minutes: float | None = None) -> dict[str, int]:
    """Checkpoint bytes a run writes into its run folder (worst case) and keeps there once finished.

    `weights` and `resumable` are `checkpoint_bytes`'s; a paper run of 15 epochs makes 105
    evaluations. The worst case has a new best of every kept task between any two copies, so
    each kept `best-<task>` is copied at every copy point and at the end (with
    `checkpoint_every` 1, written at every evaluation). The `last` checkpoint is copied
    resumable at each copy point before the end; the end writes its weights only if kept.

    Copies by wall-clock time (`TrainConfig.checkpoint_minutes`) depend on how long an
    evaluation interval takes, which the sizes alone cannot tell: without `eval_minutes` (wall-clock
    minutes from one evaluation to the next) only the copies every `checkpoint_every` evaluations are
    counted, a lower bound. With it, a copy comes every min(checkpoint_every,
    ceil(checkpoint_minutes / eval_minutes)) evaluations.
    """
    kept = kept_checkpoints(keep_weights, task_names)
    bests = len(kept - {"last"})
    every = checkpoint_every
    if every > 1 and eval_minutes and checkpoint_minutes:
        every = max(1, min(every, math.ceil(checkpoint_minutes / eval_minutes)))  # still through local disk
    copies = (evaluations - 1) // every  # copy points before the final evaluation
    best_copies = evaluations if checkpoint_every == 1 else copies + 1
    written = copies * resumable + ("last" in kept) * weights + bests * best_copies * weights
    return {"written": written, "kept": len(kept) * weights}
