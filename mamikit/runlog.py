"""The run log the training loop writes: loss rows in log.jsonl and TensorBoard scalars (section 4).

The loop of `mamikit.train` computes the loss of equations 5-6 on every batch
and scores every split several times per epoch (figure 5's samples). A run
keeps both, in its run directory (docs/design.md "Run directory"):

- `log.jsonl` gets, beside the evaluation rows of `mamikit.evaluation`, one
  row per optimiser step (accumulation window) with "kind": "loss": the step
  (batches seen, the evaluation rows' axis), epoch, learning rate, the number
  of batches and the window's mean of every loss term ("loss", "<task>/bce",
  "proj_align", ...; a task's term is averaged over the batches of its dataset).
- `tensorboard/` holds the same as TensorBoard scalars: `loss/total`,
  `loss/<term>`, `lr`, and every logged score as `<metric>/<split>/<task>`
  (`/<label>` for a label's), so `%tensorboard --logdir <runs>` follows a
  round live.

:class:`TrainingLog` writes both. It sits below the modules that read the log
(`curves`, `analysis`): the loop logs, the notebooks plot.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from .utils import append_jsonl, get_logger

log = get_logger(__name__)

LOSS_KIND = "loss"  # the "kind" of a loss row in log.jsonl; evaluation rows have none
TENSORBOARD_DIR = "tensorboard"  # the run directory's TensorBoard folder
PENDING_KEY = "loss_window"  # the loop state's key for the window in progress (kept by the last checkpoint)

_warned_no_tensorboard = False


# ----------------------------------------------------------------------------- writing


def _summary_writer(folder: Path, purge_step: int | None):
    """A TensorBoard SummaryWriter, or None (warned once) when tensorboard is not installed."""
    global _warned_no_tensorboard
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        if not _warned_no_tensorboard:
            log.warning("tensorboard is not installed: runs keep their loss rows in log.jsonl but write no "
                        "TensorBoard scalars (pip install tensorboard)")
            _warned_no_tensorboard = True
        return None
    return SummaryWriter(str(folder), purge_step=purge_step, flush_secs=30)


def score_tag(row: dict) -> str:
    """The curve name of an evaluation row: `<metric>/<split>/<task>`, plus `/<label>` for a label's."""
    tag = f"{row['metric']}/{row['split']}/{row['task']}"
    return tag if row.get("label") is None else f"{tag}/{row['label']}"


def loss_tag(term: str) -> str:
    """The curve name of a loss term: `loss/total` for the summed loss, `loss/<term>` otherwise."""
    return "loss/total" if term == "loss" else f"loss/{term}"


class TrainingLog:
    """One run's loss rows (log.jsonl) and TensorBoard scalars, fed by the training loop.

    Per batch the loop calls :meth:`add_batch`, after each optimiser step
    :meth:`end_window`, after each evaluation :meth:`scores`, and :meth:`close`
    when it stops. The window in progress lives in `state[PENDING_KEY]` from
    each evaluation on, so the `last` checkpoint carries it and a resumed run
    writes the same rows as an uninterrupted one. Loss rows are appended at
    each evaluation (one write instead of one per optimiser step); TensorBoard
    gets them at once.
    """

    def __init__(self, run_dir, experiment: str, seed: int, state: dict, resume: bool, tensorboard: bool = True):
        """Open the run's log for writing; `resume` keeps what the last checkpoint's step covers."""
        self.path = Path(run_dir) / "log.jsonl"
        self.experiment, self.seed, self.state = experiment, seed, state
        folder = Path(run_dir) / TENSORBOARD_DIR
        if not resume and folder.exists():
            shutil.rmtree(folder)  # a fresh run: the scalars of an earlier one would mix in
        # On resume, TensorBoard drops what the killed process wrote after the checkpoint (purge_step).
        self.writer = _summary_writer(folder, state["step"] + 1 if resume else None) if tensorboard else None
        self.offset = self.path.stat().st_size if self.path.exists() else 0  # log bytes already sent to TensorBoard
        pending = state.get(PENDING_KEY) or {}
        self.sums = {k: float(v) for k, v in pending.get("sums", {}).items()}  # term -> sum over the window
        self.counts = {k: int(v) for k, v in pending.get("counts", {}).items()}  # term -> batches that had it
        self.lr = pending.get("lr")
        self.rows: list[dict] = []  # loss rows not yet appended to log.jsonl

    def add_batch(self, terms: dict, lr: float) -> None:
        """Add one batch's loss terms (tensors or floats) to the window; `lr` is the rate its step uses."""
        import torch

        for name, value in terms.items():
            # Kept as tensors on the model's device: no synchronisation per batch.
            value = value.detach().to(torch.float64) if isinstance(value, torch.Tensor) else float(value)
            self.sums[name] = self.sums.get(name, 0.0) + value
            self.counts[name] = self.counts.get(name, 0) + 1
        self.lr = float(lr)

    def end_window(self, step: int, epoch: int) -> dict | None:
        """The optimiser stepped: the window's mean terms become a loss row (returned) and scalars."""
        if not self.counts:
            return None
        terms = {name: float(self.sums[name]) / self.counts[name] for name in self.sums}
        row = {"kind": LOSS_KIND, "experiment": self.experiment, "seed": self.seed, "epoch": epoch, "step": step,
               "lr": self.lr, "batches": self.counts.get("loss", max(self.counts.values())), "terms": terms}
        self.rows.append(row)
        if self.writer is not None:
            for name, value in terms.items():
                self.writer.add_scalar(loss_tag(name), value, step)
            self.writer.add_scalar("lr", self.lr, step)
        self.sums, self.counts = {}, {}
        return row

    def scores(self, step: int) -> int:
        """After an evaluation: its log rows become scalars, the loss rows are appended, the window is kept.

        Returns:
            The number of score scalars written.
        """
        written = 0
        for row in self._new_rows():
            if row.get("kind") is None and row.get("step") == step and self.writer is not None:
                self.writer.add_scalar(score_tag(row), float(row["value"]), step)
                written += 1
        self._append_rows()
        self.state[PENDING_KEY] = {"sums": {k: float(v) for k, v in self.sums.items()}, "counts": dict(self.counts),
                                   "lr": self.lr}
        if self.writer is not None:
            self.writer.flush()
        return written

    def close(self) -> None:
        """Append what is buffered and close the TensorBoard writer."""
        self._append_rows()
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def _append_rows(self) -> None:
        append_jsonl(self.path, self.rows)
        self.rows = []
        self.offset = self.path.stat().st_size if self.path.exists() else 0

    def _new_rows(self) -> list[dict]:
        """Whole rows appended to log.jsonl since the last call."""
        if not self.path.exists():
            return []
        with open(self.path, "rb") as fh:
            fh.seek(self.offset)
            data = fh.read()
        end = data.rfind(b"\n") + 1  # a row cut by a kill is read once it is whole
        self.offset += end
        rows = []
        for line in data[:end].decode("utf-8", errors="replace").splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:
                continue
        return rows
