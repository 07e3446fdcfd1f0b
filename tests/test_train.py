"""The training loop and the run directory it writes: logged scores, answer files, resume, determinism."""

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from mamikit.checkpoints import load_checkpoint
from mamikit.metrics import score_a, score_b, score_files
from mamikit.evaluation import batch_for, predict_split
from mamikit.runs import load_run, prepare_data, run_is_complete
from mamikit.train import TrainConfig, train, train_step
from mamikit.utils import MamikitError

SMALL = dict(epochs=2, evals_per_epoch=2, accumulation=2, batch_size=16, eval_batch_size=32, device="cpu")


def _rows(run):
    """The evaluation rows of a run's log (its training loss rows are test_curves')."""
    rows = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    return [r for r in rows if r.get("kind") != "loss"]


@pytest.fixture(scope="module")
def run30(tiny_data, tiny_store, tmp_path_factory):
    """Experiment 30 (multi-task, proj_align) trained briefly, keeping its last weights too (init_from reads them)."""
    out = tmp_path_factory.mktemp("runs") / "30-seed0"
    return train("30", tiny_data, tiny_store, out, train_cfg=TrainConfig(**SMALL, keep_weights="best+last"),
                 progress=False)


def test_log_has_every_evaluation_split_task_and_metric(run30):
    rows = _rows(run30)
    keys = {"experiment", "seed", "epoch", "step", "split", "source", "task", "label", "metric", "value"}
    assert all(set(r) == keys for r in rows)
    evals = sorted({r["step"] for r in rows})
    assert len(evals) == SMALL["epochs"] * SMALL["evals_per_epoch"]
    official = {(r["step"], r["split"], r["task"]) for r in rows if r["metric"] == "score" and r["label"] is None}
    # MAMI has train/dev/test; FBHM train/dev/test (test = dev_seen); every task each time.
    tasks = {"MAMI", "Task_A", "Task_B", "Hateful"}
    assert {t for _, _, t in official} == tasks
    assert len({k for k in official if k[1] != "train"}) == len(evals) * 2 * len(tasks)
    # Train scores come from the running predictions: each epoch's last evaluation has seen every training meme
    # (a mid-epoch one, only the datasets drawn so far).
    ends = evals[SMALL["evals_per_epoch"] - 1::SMALL["evals_per_epoch"]]
    assert ({(s, t) for s, split, t in official if split == "train" and s in ends}
            == {(s, t) for s in ends for t in tasks})
    per_label = {(r["task"], r["label"], r["metric"]) for r in rows if r["label"] is not None}
    assert ("Task_B", "violence", "auc") in per_label and ("Task_A", "misogynous", "accuracy") in per_label
    assert run_is_complete(run30)


def test_logged_scores_equal_official_scores_of_saved_predictions(run30):
    rows = _rows(run30)
    last = max(r["step"] for r in rows)
    for split in ("train", "dev", "test"):
        for task, labels in (("Task_A", ["misogynous"]),
                             ("Task_B", ["shaming", "stereotype", "objectification", "violence"])):
            df = pd.read_csv(run30 / "predictions" / "last" / f"{split}__{task}.csv", dtype={"id": str})
            gold = df[labels].to_numpy()
            pred = (df[[f"{label}_prob" for label in labels]].to_numpy() >= 0.5).astype(int)
            expected = score_a(gold[:, 0], pred[:, 0]) if len(labels) == 1 else score_b(gold, pred)
            logged = [r["value"] for r in rows if r["step"] == last and r["split"] == split and r["task"] == task
                      and r["metric"] == "score" and r["label"] is None]
            assert logged == [pytest.approx(expected, abs=1e-6)]


def test_answer_files_score_like_the_logged_test_scores(run30, tiny_data):
    rows = _rows(run30)
    truth = tiny_data / "MAMI" / "test_labels.txt"

    def logged(task, step):
        return next(r["value"] for r in rows if r["step"] == step and r["split"] == "test" and r["task"] == task
                    and r["metric"] == "score" and r["label"] is None)

    last = max(r["step"] for r in rows)
    scores = score_files(truth, run30 / "answer" / "last" / "taskB" / "answer.txt")
    assert scores["taska"] == pytest.approx(logged("Task_A", last), abs=1e-6)
    assert scores["taskb"] == pytest.approx(logged("Task_B", last), abs=1e-6)
    state = json.loads((run30 / "checkpoints" / "last" / "state.json").read_text())
    best_a, best_b = state["best"]["Task_A"]["step"], state["best"]["Task_B"]["step"]
    assert (score_files(truth, run30 / "answer" / "best" / "taskA" / "answer.txt")["taska"]
            == pytest.approx(logged("Task_A", best_a), abs=1e-6))
    assert (score_files(truth, run30 / "answer" / "best" / "taskB" / "answer.txt")["taskb"]
            == pytest.approx(logged("Task_B", best_b), abs=1e-6))
    # the best checkpoint is the evaluation with the highest dev score
    dev = {r["step"]: r["value"] for r in rows
           if r["split"] == "dev" and r["task"] == "Task_A" and r["metric"] == "score" and r["label"] is None}
    assert dev[best_a] == max(dev.values())


def test_loaded_best_checkpoint_reproduces_its_predictions(run30, tiny_data):
    loaded = load_run(run30, "best", task="Task_A", device="cpu")
    from mamikit.store import FeatureStore

    data = prepare_data(loaded.experiment, tiny_data, FeatureStore(loaded.config["features"]))
    got = predict_split(loaded.model, loaded.experiment, data[("MAMI", "test")], device="cpu")["probs"]["Task_A"][:, 0]
    saved = pd.read_csv(run30 / "predictions" / "best-Task_A" / "test__Task_A.csv")["misogynous_prob"].to_numpy()
    np.testing.assert_allclose(got, saved, atol=1e-5)


def test_optimiser_steps_follow_accumulation_and_clipping(tiny_data, tiny_store, tmp_path, monkeypatch):
    from mamikit.optim import MADGRAD

    calls = []
    real = MADGRAD.step

    def spy(self, closure=None, *, grad_scale=None):
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        total = float(torch.linalg.vector_norm(torch.stack([grad.norm() for grad in grads])))
        calls.append((total, total * float(grad_scale)))  # the norm before and after clipping
        return real(self, closure, grad_scale=grad_scale)

    monkeypatch.setattr(MADGRAD, "step", spy)
    cfg = TrainConfig(**dict(SMALL, accumulation=3, epochs=1))
    out = train("02", tiny_data, tiny_store, tmp_path / "run", train_cfg=cfg, progress=False)
    config = json.loads((out / "config.json").read_text())
    from mamikit.data import load_datasets

    n = len(load_datasets(tiny_data, datasets=["MAMI"])["MAMI"].splits["train"])
    batches = math.ceil(n / cfg.batch_size)
    assert len(calls) == math.ceil(batches / 3)
    assert all(after <= cfg.clip_norm + 1e-4 for _, after in calls)
    assert any(total > cfg.clip_norm for total, _ in calls)  # clipping actually engaged
    assert all(after == pytest.approx(min(total, cfg.clip_norm), rel=1e-4) for total, after in calls)
    state = json.loads((out / "checkpoints" / "last" / "state.json").read_text())
    assert state["scheduler_last_epoch"] == len(calls)
    assert config["train"]["accumulation"] == 3


def test_resume_after_interruption_equals_an_uninterrupted_run(tiny_data, tiny_store, tmp_path):
    cfg = TrainConfig(**dict(SMALL, accumulation=3))
    full = train("10", tiny_data, tiny_store, tmp_path / "full", train_cfg=cfg, progress=False)
    # Stop after the first evaluation (mid-epoch, mid accumulation window), then resume.
    part = train("10", tiny_data, tiny_store, tmp_path / "part", train_cfg=cfg, progress=False, stop_after_evals=1)
    assert not run_is_complete(part)
    with open(part / "log.jsonl", "a") as fh:  # a half-written row from the killed process
        fh.write('{"experiment": "10", "seed": 0, "ep')
    with pytest.raises(MamikitError, match="--resume"):
        train("10", tiny_data, tiny_store, part, train_cfg=cfg, progress=False)
    train("10", tiny_data, tiny_store, part, train_cfg=cfg, progress=False, resume=True)
    assert (part / "log.jsonl").read_bytes() == (full / "log.jsonl").read_bytes()
    for name in ("test__Task_A.csv", "dev__Task_B.csv"):
        assert ((part / "predictions" / "last" / name).read_bytes()
                == (full / "predictions" / "last" / name).read_bytes())


def test_same_seed_gives_byte_identical_logs_and_predictions(tiny_data, tiny_store, tmp_path):
    cfg = TrainConfig(**dict(SMALL, epochs=1))
    a = train("13", tiny_data, tiny_store, tmp_path / "a", train_cfg=cfg, progress=False)
    b = train("13", tiny_data, tiny_store, tmp_path / "b", train_cfg=cfg, progress=False)
    assert (a / "log.jsonl").read_bytes() == (b / "log.jsonl").read_bytes()
    assert ((a / "predictions" / "last" / "test__Task_B.csv").read_bytes()
            == (b / "predictions" / "last" / "test__Task_B.csv").read_bytes())
    c = train("13", tiny_data, tiny_store, tmp_path / "c", train_cfg=TrainConfig(**dict(SMALL, epochs=1, seed=1)),
              progress=False)
    assert (a / "log.jsonl").read_bytes() != (c / "log.jsonl").read_bytes()


def test_checkpoint_from_another_configuration_is_refused(run30, tiny_data, tiny_store, tmp_path):
    other = train("02", tiny_data, tiny_store, tmp_path / "02", train_cfg=TrainConfig(**dict(SMALL, epochs=1)),
                  progress=False)
    loaded = load_run(other, "best", device="cpu")
    with pytest.raises(MamikitError, match="another model configuration"):
        load_checkpoint(run30 / "checkpoints" / "last", loaded.model)


@pytest.mark.smoke
def test_shared_encoder_experiment_trains(tiny_data, tiny_store, tmp_path):
    out = train("00", tiny_data, tiny_store, tmp_path / "00",
                train_cfg=TrainConfig(**dict(SMALL, epochs=1, evals_per_epoch=1)), progress=False)
    tasks = {r["task"] for r in _rows(out)}
    assert tasks == {"MAMI", "Task_A", "Task_B"}


def test_train_step_scales_the_gradient_by_the_window(run30, tiny_data):
    from mamikit.store import FeatureStore

    loaded = load_run(run30, "last", device="cpu")
    data = prepare_data(loaded.experiment, tiny_data, FeatureStore(loaded.config["features"]))
    model = loaded.model.train()
    batch = batch_for(model, loaded.experiment, data[("MAMI", "train")], np.arange(8), True)
    grads, terms = [], []
    for window in (1, 4):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(0)  # the same dropout masks
        terms.append(train_step(model, batch, loaded.experiment, loaded.tasks, window))
        grads.append(model.queries.grad.clone())
    torch.testing.assert_close(grads[1] * 4, grads[0])
    assert terms[0]["loss"] == terms[1]["loss"]  # the terms are the batch's, unscaled
    assert {"loss", "proj_align", "Task_A/bce", "Task_B/bce"} <= set(terms[0]) and "Hateful/bce" not in terms[0]


def test_config_records_recipe_switches_and_training_split_pos_weights(run30, tiny_data, tiny_store):
    from mamikit.experiments import get_experiment, recipe_switches
    from mamikit.store import FeatureStore

    config = json.loads((run30 / "config.json").read_text())
    assert config["experiment"]["recipe"] == "paper"
    assert {k: config["experiment"][k] for k in recipe_switches("paper")} == recipe_switches("paper")
    data = prepare_data(get_experiment("30"), tiny_data, FeatureStore(tiny_store))
    for task, weights in config["pos_weight"].items():
        dataset = "FBHM" if task == "Hateful" else "MAMI"
        train_split = data[(dataset, "train")]
        for label, value in weights.items():
            column = train_split.targets[:, list(train_split.labels).index(label)]
            assert value == pytest.approx((column == 0).sum() / max((column == 1).sum(), 1))
    assert set(config["pos_weight"]["Task_B"]) == {"shaming", "stereotype", "objectification", "violence"}


def test_init_from_starts_from_another_runs_last_weights(run30, tiny_data, tiny_store, tmp_path):
    from safetensors.torch import load_file

    cfg = TrainConfig(**dict(SMALL, epochs=1, evals_per_epoch=1, lr=0.0, init_from=str(run30), keep_weights="last"))
    out = train("30", tiny_data, tiny_store, tmp_path / "continued", train_cfg=cfg, progress=False)
    before = load_file(run30 / "checkpoints" / "last" / "weights.safetensors")
    after = load_file(out / "checkpoints" / "last" / "weights.safetensors")
    for name in ("queries", "heads.Task_A.fc1.weight"):
        torch.testing.assert_close(after[name], before[name])  # learning rate 0: the loaded weights stay
    assert json.loads((out / "config.json").read_text())["train"]["init_from"] == str(run30)


def test_cuda_random_states_come_back_to_their_devices_in_order(run30, tmp_path, monkeypatch):
    """A resumable checkpoint keeps each CUDA generator's state and restores them by device number (10 after 9)."""
    from mamikit.checkpoints import save_checkpoint
    from mamikit.optim import MADGRAD

    model = load_run(run30, "best", device="cpu").model
    optimizer = MADGRAD([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    states = [torch.full((16,), i, dtype=torch.uint8) for i in range(11)]  # eleven devices' generator states
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: len(states))
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: states)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", restored.extend)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    state = {"epoch": 0, "batch_in_epoch": 0, "step": 1, "evals": 1, "best": {}, "complete": False}
    save_checkpoint(tmp_path / "last", model, state, optimizer, scheduler)
    load_checkpoint(tmp_path / "last", model, optimizer)
    assert [int(s[0]) for s in restored] == list(range(11))


# ------------------------------------------------------------------ optimiser steps and schedule (fidelity row 21)


def _loss_rows(run):
    return [r for r in map(json.loads, (run / "log.jsonl").read_text().splitlines()) if r.get("kind") == "loss"]


def _linear(step: int, warm: int, total: int) -> float:
    """The peak rate's factor at step `step`: linear warm-up over `warm` steps, then linear to 0 at `total`."""
    return step / max(1, warm) if step < warm else max(0.0, (total - step) / max(1, total - warm))


def _mami_batches(tiny_data, batch_size):
    from mamikit.data import load_datasets

    return math.ceil(len(load_datasets(tiny_data, datasets=["MAMI"])["MAMI"].splits["train"]) / batch_size)


def test_step_plans_of_the_paper_and_of_the_authors_trainer():
    from mamikit.train import StepPlan

    paper, authors = StepPlan(7, 2, 3, as_coded=False), StepPlan(7, 2, 3, as_coded=True)
    # windows run across the epoch boundary; the run's last, shorter window is stepped too
    assert paper.step_batches() == [3, 6, 9, 12, 14] and paper.total_steps == 5
    assert [paper.loss_divisor(e, b) for e in range(2) for b in range(7)] == [3] * 12 + [2, 2]
    # a step when (batch index + 1) % 3 == 0 within each epoch; an epoch's last batch (index 6) carries its
    # gradient into the next epoch's first window (3 + 1 batches); the run's last one is never stepped
    assert authors.step_batches() == [3, 6, 10, 13] and authors.total_steps == (7 // 3) * 2
    assert {authors.loss_divisor(e, b) for e in range(2) for b in range(7)} == {3}
    assert [authors.steps_after(1, b) for b in range(7)] == [False, False, True, False, False, True, False]
    # section 4's sizes: 925 batches an epoch, accumulation 20, 15 epochs (705 steps were scheduled before)
    big = StepPlan(925, 15, 20, as_coded=False)
    assert big.total_steps == len(big.step_batches()) == 694
    assert StepPlan(925, 15, 20, as_coded=True).total_steps == len(StepPlan(925, 15, 20, True).step_batches()) == 690
    with pytest.raises(MamikitError, match="accumulation 3 .* 2 batches"):
        StepPlan(2, 3, 3, as_coded=True)  # the authors' windows would never close


@pytest.mark.parametrize("as_coded", [False, True])
def test_schedule_reaches_zero_with_the_last_step_taken(as_coded):
    from mamikit.train import StepPlan, linear_schedule

    plan = StepPlan(925, 15, 20, as_coded)
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=2e-4)
    sched = linear_schedule(opt, plan, 0.1)
    rates = []
    for _ in plan.step_batches():
        rates.append(opt.param_groups[0]["lr"])  # the rate this step uses
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == 0 and rates[-1] > 0  # the last step still moves; then 0
    assert rates.index(max(rates)) == plan.total_steps // 10  # warm-up: the authors' t_total // 10
    assert max(rates) == pytest.approx(2e-4)


def test_paper_schedule_is_sized_by_the_steps_the_loop_takes(tiny_data, tiny_store, tmp_path):
    from mamikit.train import StepPlan

    cfg = TrainConfig(**dict(SMALL, evals_per_epoch=1))  # 2 epochs, accumulation 2
    out = train("02", tiny_data, tiny_store, tmp_path / "run", train_cfg=cfg, progress=False)
    n = _mami_batches(tiny_data, cfg.batch_size)
    plan = StepPlan(n, cfg.epochs, cfg.accumulation, as_coded=False)
    assert math.ceil(n / cfg.accumulation) * cfg.epochs != plan.total_steps  # where the old sizing was off
    rows = _loss_rows(out)  # one per optimiser step
    assert [r["step"] for r in rows] == plan.step_batches() == [2, 4, 6, 8, 10]
    state = json.loads((out / "checkpoints" / "last" / "state.json").read_text())
    assert state["scheduler_last_epoch"] == plan.total_steps == len(rows)
    total, warm = len(rows), int(len(rows) * cfg.warmup_fraction)
    # get_linear_schedule_with_warmup's rate of each step taken; it is 0 at step `total`, the first not taken
    assert [r["lr"] for r in rows] == pytest.approx([cfg.lr * _linear(i, warm, total) for i in range(total)])
    assert _linear(total, warm, total) == 0
    assert json.loads((out / "config.json").read_text())["experiment"]["schedule_as_coded"] is False


def test_authors_schedule_steps_at_their_batch_indices_and_resumes_mid_carry(tiny_data, tiny_store, tmp_path):
    from mamikit.experiments import get_experiment
    from mamikit.train import StepPlan

    assert get_experiment("02", recipe="authors").schedule_as_coded
    experiment = get_experiment("02", schedule_as_coded=True)  # the paper recipe otherwise (the tiny store's text)
    cfg = TrainConfig(**dict(SMALL, evals_per_epoch=1))  # 2 epochs, accumulation 2
    n = _mami_batches(tiny_data, cfg.batch_size)
    assert n % cfg.accumulation  # an epoch ends mid-window: its last batch carries over
    full = train(experiment, tiny_data, tiny_store, tmp_path / "full", train_cfg=cfg, progress=False)
    rows = _loss_rows(full)
    plan = StepPlan(n, cfg.epochs, cfg.accumulation, as_coded=True)
    assert [r["step"] for r in rows] == plan.step_batches() == [2, 4, n + 2, n + 4]
    # the next epoch's first window holds the carried batch too; the run's last batch is never stepped
    assert [r["batches"] for r in rows] == [2, 2, 3, 2]
    assert [r["lr"] for r in rows] == pytest.approx([cfg.lr * (4 - i) / 4 for i in range(4)])  # t_total 4, no warm-up
    state = json.loads((full / "checkpoints" / "last" / "state.json").read_text())
    assert state["scheduler_last_epoch"] == plan.total_steps == 4
    assert json.loads((full / "config.json").read_text())["experiment"]["schedule_as_coded"] is True
    # stopped at the first epoch's end, its last batch's gradient pending: the resumed run is the same run
    part = train(experiment, tiny_data, tiny_store, tmp_path / "part", train_cfg=cfg, progress=False,
                 stop_after_evals=1)
    assert not run_is_complete(part)
    train(experiment, tiny_data, tiny_store, part, train_cfg=cfg, progress=False, resume=True)
    assert (part / "log.jsonl").read_bytes() == (full / "log.jsonl").read_bytes()
    name = "test__Task_A.csv"
    assert (part / "predictions" / "last" / name).read_bytes() == (full / "predictions" / "last" / name).read_bytes()


def test_experiment_30_with_a_text_only_dataset_scores_its_task(tiny_data, tiny_store, tmp_path):
    """Section 7's more datasets: 30 plus the text-only HSText trains (its batches text only) and logs HateSpeech
    on every split; experiment 30's own datasets and recorded settings are unchanged."""
    import shutil

    from mamikit.evaluation import memory_lengths
    from mamikit.experiments import get_experiment
    from mamikit.extraction import extract
    from mamikit.store import FeatureStore
    from mamikit.synthetic import generate_single

    data, store = tmp_path / "data", tmp_path / "store"
    shutil.copytree(tiny_data, data)
    shutil.copytree(tiny_store, store)
    generate_single(data, "HSText", seed=5, n=60)
    summary = extract(data, store, "demo", batch_size=32, device="cpu", progress=False)
    assert sorted(summary["written"]) == ["HSText/dev/text", "HSText/test/text", "HSText/train/text"]
    assert FeatureStore(store).modalities("HSText", "train") == ("text",)

    experiment = get_experiment("30", extra_datasets=("HSText",), epochs=1)
    assert get_experiment("30").datasets == ("MAMI", "FBHM") and experiment.datasets == ("MAMI", "FBHM", "HSText")
    split = prepare_data(experiment, data, FeatureStore(store))[("HSText", "train")]
    assert split.modalities == ("text",) and split.features.clip is None
    lengths = memory_lengths(experiment, split)  # text tokens only: no DETR queries counted
    assert (lengths == np.diff(split.features.text_offsets.numpy())[split.rows]).all()

    out = tmp_path / "run"
    cfg = TrainConfig(epochs=1, evals_per_epoch=1, batch_size=16, accumulation=2, device="cpu")
    train(experiment, data, store, out, train_cfg=cfg, progress=False)
    config = json.loads((out / "config.json").read_text())
    assert config["experiment"]["extra_datasets"] == ["HSText"]
    assert {t["name"] for t in config["tasks"]} == {"MAMI", "Task_A", "Task_B", "Hateful", "HateSpeech"}
    scored = {(r["split"], r["task"]) for r in _rows(out) if r["metric"] == "score" and r["label"] is None}
    assert {("train", "HateSpeech"), ("dev", "HateSpeech"), ("test", "HateSpeech"), ("dev", "Task_A")} <= scored
    assert (out / "predictions" / "last" / "test__HateSpeech.csv").is_file()
    losses = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    terms = [r["terms"] for r in losses if r.get("kind") == "loss"]
    assert any("HateSpeech/bce" in t for t in terms) and all(math.isfinite(v) for t in terms for v in t.values())
