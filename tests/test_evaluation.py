"""Evaluation during training (section 4): dev/test through the inference path, train-split scores from running
predictions."""

import json

import numpy as np
import pytest
import torch

from mamikit.registry import Task
from mamikit.evaluation import RunningPredictions, batch_for, map_batches, predict_split, split_metrics, task_targets
from mamikit.runs import load_run, prepare_data
from mamikit.train import TrainConfig, train, train_step
from mamikit.utils import MamikitError

SMALL = dict(epochs=2, evals_per_epoch=2, accumulation=2, batch_size=16, eval_batch_size=32, device="cpu")


def _rows(run):
    """The run's evaluation rows (loss rows, which carry a "kind", left out)."""
    rows = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    return [r for r in rows if "kind" not in r]


@pytest.fixture(scope="module")
def runs(tiny_data, tiny_store, tmp_path_factory):
    """Experiment 30 trained twice with the same seed: train scores "running" (the default) and "full"; last
    weights kept."""
    root = tmp_path_factory.mktemp("eval-runs")
    return {mode: train("30", tiny_data, tiny_store, root / mode,
                        train_cfg=TrainConfig(**SMALL, train_scores=mode, keep_weights="last"), progress=False)
            for mode in ("running", "full")}


@pytest.fixture(scope="module")
def last(runs, tiny_data):
    """The running run's last weights and its data."""
    from mamikit.store import FeatureStore

    loaded = load_run(runs["running"], "last", device="cpu")
    return loaded, prepare_data(loaded.experiment, tiny_data, FeatureStore(loaded.config["features"]))


@torch.no_grad()
def _straightforward_probs(model, experiment, data, batch_size=64):
    """Probabilities as evaluation computed them before the inference path: batches in split order."""
    model.eval()
    out = {}
    for start in range(0, len(data), batch_size):
        batch = batch_for(model, experiment, data, np.arange(start, min(start + batch_size, len(data))), False)
        for task, logits in model(batch).logits.items():
            out.setdefault(task, []).append(torch.sigmoid(logits))
    return {task: torch.cat(v).numpy() for task, v in out.items()}


def test_inference_path_gives_the_straightforward_probabilities(last):
    loaded, data = last
    for key in (("MAMI", "dev"), ("MAMI", "test"), ("FBHM", "dev")):
        split = data[key]
        want = _straightforward_probs(loaded.model, loaded.experiment, split)
        for batch_size, workers in ((5, 1), (5, 3), (64, None), (1000, None)):
            got = predict_split(loaded.model, loaded.experiment, split, batch_size, workers=workers)["probs"]
            assert set(got) == set(want)
            for task in want:
                np.testing.assert_allclose(got[task], want[task], rtol=0, atol=1e-6)


def test_batches_shared_out_to_threads_come_back_in_order_and_the_thread_count_is_restored():
    threads = torch.get_num_threads()
    seen = []

    def fn(start):
        seen.append((start, torch.get_num_threads()))
        return start * 10

    assert map_batches(fn, range(0, 50, 5), workers=3) == list(range(0, 500, 50))
    assert {n for _, n in seen} == {1}  # each batch on one core
    assert [s for s, _ in seen][0] == 45  # the last (longest) batches start first
    assert torch.get_num_threads() == threads

    def fails(start):
        if start == 20:
            raise ValueError("batch 20")
        return start

    with pytest.raises(ValueError, match="batch 20"):
        map_batches(fails, range(0, 50, 5), workers=2)
    assert torch.get_num_threads() == threads  # restored after an error too
    seen.clear()
    assert map_batches(fn, [0, 5], workers=1) == [0, 50] and seen[0][1] == threads  # one worker: as it was


def test_logged_dev_and_test_scores_are_todays_evaluation(runs, last):
    """The last evaluation's dev/test rows equal the official scores of the straightforward pass."""
    loaded, data = last
    rows = _rows(runs["running"])
    step = max(r["step"] for r in rows)
    for (name, split), d in data.items():
        if split == "train":
            continue
        probs = _straightforward_probs(loaded.model, loaded.experiment, d)
        for task in (t for t in loaded.tasks if t.dataset == name):
            targets, known = task_targets(task, d)
            want = {(label, metric): round(float(v), 6)
                    for label, metric, v in split_metrics(task, probs[task.name][known], targets[known])}
            got = {(r["label"], r["metric"]): r["value"] for r in rows
                   if r["step"] == step and r["split"] == split and r["task"] == task.name}
            assert got == want, (name, split, task.name)
            assert {r["source"] for r in rows if r["split"] == split} == {"full"}


def test_dev_and_test_do_not_depend_on_how_the_train_split_is_scored(runs):
    """A full pass over the training split draws no random numbers: training and dev/test go on identically."""
    def held_out(run):
        return [r for r in _rows(run) if r["split"] != "train"]

    assert held_out(runs["running"]) == held_out(runs["full"])


def test_train_rows_come_from_running_predictions_unless_a_full_pass_is_asked(runs, last):
    running, full = _rows(runs["running"]), _rows(runs["full"])
    steps = sorted({r["step"] for r in running})
    ends = steps[1::2]  # two evaluations per epoch: every second one closes an epoch
    assert {r["source"] for r in running if r["split"] == "train"} == {"running"}
    assert {r["step"] for r in full if r["split"] == "train" and r["source"] == "full"} == set(ends)
    assert {r["step"] for r in full if r["split"] == "train" and r["source"] == "running"} == set(steps) - set(ends)
    # The full pass at the run's end is an eval-mode pass of the last weights over the whole training split.
    loaded, data = last
    split = data[("MAMI", "train")]
    probs = predict_split(loaded.model, loaded.experiment, split)["probs"]
    task = next(t for t in loaded.tasks if t.name == "Task_A")
    targets, known = task_targets(task, split)
    want = round(float(split_metrics(task, probs["Task_A"][known], targets[known])[0][2]), 6)
    got = [r["value"] for r in full if r["step"] == steps[-1] and r["split"] == "train" and r["task"] == "Task_A"
           and r["label"] is None and r["metric"] == "score"]
    assert got == [want]


def test_running_scores_cover_the_memes_seen_so_far_in_the_epoch(runs, last, tiny_data, tiny_store, tmp_path):
    """Mid-epoch the train predictions hold the memes of the epoch's batches so far; at the epoch's end all of them."""
    import pandas as pd

    from mamikit.batching import epoch_batches
    from mamikit.train import _eval_points

    _, data = last
    split = data[("MAMI", "train")]
    saved = pd.read_csv(runs["running"] / "predictions" / "last" / "train__Task_A.csv", dtype={"id": str})
    assert saved["id"].tolist() == split.ids  # the last evaluation closes an epoch
    part = train("30", tiny_data, tiny_store, tmp_path / "part", train_cfg=TrainConfig(**SMALL), progress=False,
                 stop_after_evals=1)
    sizes = {name: len(data[(name, "train")]) for name in ("MAMI", "FBHM")}
    order = epoch_batches(sizes, SMALL["batch_size"], np.random.default_rng([0, 0]))
    first = min(_eval_points(len(order), SMALL["evals_per_epoch"]))
    seen = sorted(i for name, index in order[:first] if name == "MAMI" for i in index)
    mid = pd.read_csv(part / "predictions" / "last" / "train__Task_A.csv", dtype={"id": str})
    assert 0 < len(seen) < len(split)
    assert mid["id"].tolist() == [split.ids[i] for i in seen]


def test_train_step_returns_the_batchs_probabilities(last):
    loaded, data = last
    model = loaded.model.eval()  # dropout off: the training forward is the evaluation forward
    batch = batch_for(model, loaded.experiment, data[("MAMI", "train")], np.arange(10), True)
    terms, probs = train_step(model, batch, loaded.experiment, loaded.tasks, return_probs=True)
    model.zero_grad(set_to_none=True)
    assert "loss" in terms and set(probs) == {"MAMI", "Task_A", "Task_B"}
    want = predict_split(model, loaded.experiment, data[("MAMI", "train")])["probs"]
    for task, p in probs.items():
        assert not p.requires_grad
        np.testing.assert_allclose(p.numpy(), want[task][:10], rtol=0, atol=1e-5)
    # callers without it: the terms
    assert set(train_step(model, batch, loaded.experiment, loaded.tasks)) == set(terms)
    model.zero_grad(set_to_none=True)


def test_running_predictions_sort_by_position_and_survive_a_checkpoint():
    tasks = [Task("A", "D", ("x",)), Task("B", "D", ("y", "z")), Task("H", "E", ("h",))]
    running = RunningPredictions()
    running.add("D", np.array([5, 1]), {"A": torch.tensor([[0.5], [0.1]]), "B": torch.tensor([[5.0, 50], [1, 10]])})
    running.add("D", [3], {"A": torch.tensor([[0.3]]), "B": torch.tensor([[3.0, 30]])})
    running.add("E", [0], {"H": torch.tensor([[0.9]])})
    for r in (running, RunningPredictions(running.tensors())):
        seen, probs = r.split("D", tasks[:2])
        np.testing.assert_array_equal(seen, [1, 3, 5])
        np.testing.assert_allclose(probs["A"][:, 0], [0.1, 0.3, 0.5])
        np.testing.assert_allclose(probs["B"], [[1, 10], [3, 30], [5, 50]])
    seen, probs = RunningPredictions().split("D", tasks[:2])
    assert len(seen) == 0 and probs == {}


def test_bad_train_scores_setting_is_refused():
    with pytest.raises(MamikitError, match="train_scores"):
        TrainConfig(train_scores="sometimes")
