"""A resume from the run folder's older `last` keeps nothing of the timeline it throws away (mamikit.checkpoints).

A lost Colab machine takes the local `last` with it; the run resumes from the
run folder's copy and redoes the evaluations after it, which on a GPU need not
repeat bit for bit. Here the redone part differs on purpose: after the reset
the optimiser's steps do nothing, so no evaluation after the copy can beat its
best dev scores, while the discarded part found new ones. The resumed run must
end with exactly the files of a run that stopped at the copy and went on the
same way: log rows, predictions, answer files, kept best weights and
TensorBoard scalars, none from the discarded evaluations.
"""

import json
import shutil

import pytest

import mamikit.train
from mamikit.checkpoints import (STAGED, checkpoint_step, local_checkpoints_dir, restore_run_files, run_files,
                                 settle_staged)
from mamikit.train import TrainConfig, train
from mamikit.utils import MamikitError

# the resumed timeline's optimiser never steps, and its scheduler says so
pytestmark = pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")

# 5 evaluations, one per two batches; copies into the run folder after the 2nd and 4th, and at the end
SMALL = dict(epochs=1, evals_per_epoch=5, batch_size=8, accumulation=2, eval_batch_size=32, device="cpu",
             checkpoint_every=2, checkpoint_minutes=None, keep_weights="all")
COPIED = 2  # the evaluation whose copy the reset leaves in the run folder


class Killed(Exception):
    """The process died here (a fault point, raised instead of SIGKILL to stay in this process)."""


def _kill_at(monkeypatch, point: str, nth: int) -> None:
    """The training loop dies the `nth` time it passes fault point `point`."""
    counts = {}

    def fault(name):
        counts[name] = counts.get(name, 0) + 1
        if name == point and counts[name] == nth:
            raise Killed(f"{name} {nth}")

    monkeypatch.setattr(mamikit.train, "fault_point", fault)


def _another_machine(monkeypatch) -> None:
    """The resumed timeline: optimiser steps that change no weight, so its scores stay those of the copy."""
    monkeypatch.setattr(mamikit.train, "fault_point", lambda name: None)
    monkeypatch.setattr(mamikit.train, "optimizer_step",
                        lambda model, optimizer, clip_norm, scaler=None: optimizer.zero_grad(set_to_none=True))


def _files(run) -> dict[str, bytes]:
    """What a run folder holds but its settings record and TensorBoard's files (compared as scalars)."""
    return {p.relative_to(run).as_posix(): p.read_bytes() for p in sorted(run.rglob("*"))
            if p.is_file() and p.name not in ("config.json", ".lock", ".lock.json")
            and p.relative_to(run).parts[0] != "tensorboard"}


def _scalars(run) -> dict[str, list[tuple[int, float]]]:
    """TensorBoard's scalars as TensorBoard reads them (purged steps left out): tag -> [(step, value)]."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _best_steps(run) -> dict[str, int]:
    """Per task, the step of its best dev score in the run's log (the first of equal ones)."""
    best = {}
    for line in (run / "log.jsonl").read_text().splitlines():
        row = json.loads(line)
        if row.get("kind") is None and row["split"] == "dev" and row["metric"] == "score" and row["label"] is None:
            if row["value"] > best.get(row["task"], (-1.0, 0))[0]:
                best[row["task"]] = (row["value"], row["step"])
    return {task: step for task, (_, step) in best.items()}


@pytest.fixture(scope="module")
def timelines(tiny_data, tiny_store, tmp_path_factory):
    """A run reset after its copy point (its discarded files kept aside), and a run stopped at that copy; both
    resumed to the end on "another machine"."""
    root = tmp_path_factory.mktemp("rollback")
    cfg = TrainConfig(**SMALL, local_dir=str(root / "local"))
    with pytest.MonkeyPatch.context() as mp:
        reference = train("20", tiny_data, tiny_store, root / "reference", train_cfg=cfg, progress=False,
                          stop_after_evals=COPIED)
        _another_machine(mp)
        train("20", tiny_data, tiny_store, reference, train_cfg=cfg, progress=False, resume=True)
    run = root / "reset"
    with pytest.MonkeyPatch.context() as mp:
        # the machine dies at the 4th evaluation's copy: its new bests are staged in the run folder, `last` is not
        _kill_at(mp, "before_copy", 2)
        with pytest.raises(Killed):
            train("20", tiny_data, tiny_store, run, train_cfg=cfg, progress=False)
    discarded = root / "discarded"
    shutil.copytree(run, discarded)
    shutil.rmtree(local_checkpoints_dir(run, cfg.local_dir))  # the local disk went with the machine
    with pytest.MonkeyPatch.context() as mp:
        _another_machine(mp)
        train("20", tiny_data, tiny_store, run, train_cfg=cfg, progress=False, resume=True)
    return run, discarded, reference


def test_the_discarded_timeline_had_new_bests_after_the_copy(timelines):
    run, discarded, reference = timelines
    copied = checkpoint_step(discarded / "checkpoints" / "last")
    moved = {task for task, step in _best_steps(discarded).items() if step > copied}
    assert moved, "the discarded evaluations found no new best: this test would prove nothing"
    assert all(step <= copied for step in _best_steps(reference).values())  # the resumed timeline found none
    staged = sorted(p.name for p in (discarded / "checkpoints" / STAGED).iterdir())
    assert staged == sorted(f"best-{task}" for task in moved)
    for task in moved:
        name = f"predictions/best-{task}/dev__{task}.csv"
        assert (discarded / name).read_bytes() != (run / name).read_bytes()


def test_a_resumed_run_holds_only_its_own_timelines_files(timelines):
    run, discarded, reference = timelines
    got, want = _files(run), _files(reference)
    assert sorted(got) == sorted(want)
    for name in want:
        assert got[name] == want[name], f"{name} differs from the run that never had the discarded evaluations"
    assert "checkpoints/best-Task_B/weights.safetensors" in got and not (run / "checkpoints" / STAGED).exists()
    state = json.loads((run / "checkpoints" / "last" / "state.json").read_text())
    for task, best in state["best"].items():
        assert checkpoint_step(run / "checkpoints" / f"best-{task}") == best["step"] == _best_steps(run)[task]


def test_tensorboard_reads_only_the_resumed_timeline(timelines):
    run, discarded, reference = timelines
    scalars = _scalars(run)
    assert scalars == _scalars(reference)
    copied = checkpoint_step(discarded / "checkpoints" / "last")
    later = {(tag, step, value) for tag, points in _scalars(discarded).items() for step, value in points
             if step > copied}
    assert later and not later <= {(tag, step, value) for tag, points in scalars.items() for step, value in points}


def test_staged_bests_go_into_place_only_when_last_records_them(tiny_data, tiny_store, tmp_path):
    cfg = TrainConfig(**dict(SMALL, checkpoint_every=1))
    run = train("20", tiny_data, tiny_store, tmp_path / "run", train_cfg=cfg, progress=False, stop_after_evals=1)
    checkpoints, staged = run / "checkpoints", run / "checkpoints" / STAGED
    step = checkpoint_step(checkpoints / "last")
    staged.mkdir()
    shutil.move(checkpoints / "best-Task_A", staged / "best-Task_A")  # a kill before it was moved into place
    (staged / "best-Task_B").mkdir()  # one of an evaluation after `last`
    (staged / "best-Task_B" / "state.json").write_text(json.dumps({"task": "Task_B", "step": step + 1}))
    before = (checkpoints / "best-Task_B" / "weights.safetensors").read_bytes()
    settle_staged(checkpoints)
    assert not staged.exists() and checkpoint_step(checkpoints / "best-Task_A") == step
    assert (checkpoints / "best-Task_B" / "weights.safetensors").read_bytes() == before


def test_carried_files_come_back_exactly_and_nothing_else_stays(tmp_path):
    run = tmp_path / "run"
    for name, text in (("predictions/last/dev__Task_A.csv", "id,misogynous\n1,0\n"), ("answer/best/taskA/answer.txt",
                                                                                       "1\t0\n")):
        (run / name).parent.mkdir(parents=True, exist_ok=True)
        (run / name).write_text(text)
    files = run_files(run)
    (run / "predictions" / "last" / "dev__Task_A.csv").write_text("id,misogynous\n1,1\n")
    (run / "predictions" / "best-Task_A").mkdir()
    (run / "predictions" / "best-Task_A" / "dev__Task_A.csv").write_text("later")
    assert restore_run_files(run, files, tmp_path / "last") == 2
    assert run_files(run).keys() == files.keys() and not (run / "predictions" / "best-Task_A").exists()
    assert (run / "predictions" / "last" / "dev__Task_A.csv").read_text() == "id,misogynous\n1,0\n"
    hostile = {"file.predictions/../../outside.txt": files["file.answer/best/taskA/answer.txt"]}
    with pytest.raises(MamikitError, match=r"last: the checkpoint carries a file outside predictions/"):
        restore_run_files(run, hostile, tmp_path / "last")
