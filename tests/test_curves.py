"""Training curves: loss rows in log.jsonl, TensorBoard scalars, resume, curve plots, styled tables, the round's
bar."""

import json
import logging
import math
import re
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from mamikit import analysis, curves, rounds, runlog, train as train_module
from mamikit.curves import plot_curves, read_curves, styled_table
from mamikit.runlog import TrainingLog
from mamikit.train import TrainConfig, train
from mamikit.utils import MamikitError

SMALL = dict(epochs=2, evals_per_epoch=2, accumulation=2, batch_size=16, eval_batch_size=32, device="cpu")


def _rows(run):
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def _scalars(run) -> dict[str, list[tuple[int, float]]]:
    """The run's TensorBoard scalars read back as TensorBoard does: tag -> [(step, value)]."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


@pytest.fixture(scope="module")
def spied_run(tiny_data, tiny_store, tmp_path_factory):
    """Experiment 30 (two datasets, proj_align) trained briefly, with every batch's terms recorded.

    The loop runs a window's batches of one dataset merged (`train.train_steps`): a window's batches are
    recorded together, in the order of their groups, which leaves each window's mean as it is.
    """
    calls = []
    real = train_module.train_steps

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        for item in out:
            terms = item[0] if isinstance(item, tuple) else item  # (terms, probs) with return_probs
            calls.append({k: float(v) for k, v in terms.items()})
        return out

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train_module, "train_steps", spy)
        out = train("30", tiny_data, tiny_store, tmp_path_factory.mktemp("curves") / "30-seed0",
                    train_cfg=TrainConfig(**SMALL), progress=False)
    return out, calls


def test_loss_rows_are_the_window_means_of_the_train_step_terms(spied_run):
    run, calls = spied_run
    loss_rows = [r for r in _rows(run) if r.get("kind") == "loss"]
    windows = [calls[i:i + SMALL["accumulation"]] for i in range(0, len(calls), SMALL["accumulation"])]
    assert len(loss_rows) == len(windows) == math.ceil(len(calls) / SMALL["accumulation"])
    assert [r["step"] for r in loss_rows] == [min(len(calls), (i + 1) * SMALL["accumulation"])
                                              for i in range(len(windows))]
    for row, window in zip(loss_rows, windows):
        names = {name for terms in window for name in terms}
        assert set(row["terms"]) == names and row["batches"] == len(window)
        for name in names:
            # a task's term is averaged over the batches of its dataset only
            values = [terms[name] for terms in window if name in terms]
            assert row["terms"][name] == pytest.approx(np.mean(values), rel=1e-9, abs=1e-12), name
    assert any("Hateful/bce" in r["terms"] for r in loss_rows) and any("Task_A/bce" in r["terms"] for r in loss_rows)


def test_logged_learning_rate_follows_the_warmup_schedule(spied_run):
    from transformers import get_linear_schedule_with_warmup

    run, calls = spied_run
    lrs = [r["lr"] for r in _rows(run) if r.get("kind") == "loss"]
    total = len(lrs)
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=TrainConfig().lr)
    sched = get_linear_schedule_with_warmup(opt, int(total * 0.1), total)
    expected = []
    for _ in range(total):
        expected.append(opt.param_groups[0]["lr"])  # the rate each optimiser step uses
        opt.step()
        sched.step()
    assert lrs == pytest.approx(expected)
    assert max(lrs) == pytest.approx(TrainConfig().lr) and lrs[-1] < max(lrs)


def test_tensorboard_holds_loss_learning_rate_and_score_scalars(spied_run):
    run, _ = spied_run
    scalars = _scalars(run)
    rows = _rows(run)
    loss_rows = [r for r in rows if r.get("kind") == "loss"]
    evals = [r for r in rows if r.get("kind") is None]
    assert {"loss/total", "loss/Task_A/bce", "loss/Hateful/bce", "loss/proj_align", "lr",
            "score/dev/Task_A", "score/test/Task_B", "score/train/Hateful", "auc/dev/Task_B/violence"} <= set(scalars)
    assert [s for s, _ in scalars["loss/total"]] == [r["step"] for r in loss_rows]
    np.testing.assert_allclose([v for _, v in scalars["loss/total"]], [r["terms"]["loss"] for r in loss_rows],
                               rtol=1e-6)
    np.testing.assert_allclose([v for _, v in scalars["lr"]], [r["lr"] for r in loss_rows], rtol=1e-6)
    dev_a = [(r["step"], r["value"]) for r in evals
             if (r["split"], r["task"], r["label"], r["metric"]) == ("dev", "Task_A", None, "score")]
    assert len(dev_a) == SMALL["epochs"] * SMALL["evals_per_epoch"]
    assert [s for s, _ in scalars["score/dev/Task_A"]] == [s for s, _ in dev_a]
    np.testing.assert_allclose([v for _, v in scalars["score/dev/Task_A"]], [v for _, v in dev_a], rtol=1e-6)
    # one scalar per evaluation row, nothing else under the metrics' names
    assert sum(len(v) for tag, v in scalars.items() if not tag.startswith(("loss/", "lr"))) == len(evals)


def test_reports_ignore_the_loss_rows(spied_run, caplog):
    run, _ = spied_run
    with caplog.at_level(logging.WARNING, logger="mamikit"):
        logs = analysis.read_logs(run.parent)
    assert "skipped" not in caplog.text
    assert len(logs) == sum(1 for r in _rows(run) if r.get("kind") is None)
    assert analysis.experiment_table(logs).mean.notna().all().all()


def test_resume_writes_the_same_loss_rows_and_scalars_once(tiny_data, tiny_store, tmp_path):
    # the first evaluation falls mid-window; the resumable checkpoint is written into the run folder
    cfg = TrainConfig(**dict(SMALL, accumulation=3, checkpoint_every=1))
    full = train("10", tiny_data, tiny_store, tmp_path / "full", train_cfg=cfg, progress=False)
    part = train("10", tiny_data, tiny_store, tmp_path / "part", train_cfg=cfg, progress=False, stop_after_evals=1)
    state = json.loads((part / "checkpoints" / "last" / "state.json").read_text())
    assert state["loss_window"]["counts"]["loss"] == state["step"] % 3 > 0  # the window in progress travels
    # the killed process got further: loss rows and scalars past the checkpoint, to be dropped on resume
    log = TrainingLog(part, "10", 0, {"step": state["step"] + 5}, resume=True)
    log.add_batch({"loss": torch.tensor(9.0)}, 1.0)
    log.end_window(state["step"] + 6, 0)
    log.close()
    train("10", tiny_data, tiny_store, part, train_cfg=cfg, progress=False, resume=True)
    assert (part / "log.jsonl").read_bytes() == (full / "log.jsonl").read_bytes()
    rows = _rows(part)
    keys = [(r.get("kind"), r["step"], r.get("split"), r.get("task"), r.get("label"), r.get("metric")) for r in rows]
    assert len(keys) == len(set(keys))
    got, want = _scalars(part), _scalars(full)
    assert got.keys() == want.keys()
    for tag in want:
        assert [s for s, _ in got[tag]] == [s for s, _ in want[tag]], tag  # each step once, none missing
        np.testing.assert_allclose([v for _, v in got[tag]], [v for _, v in want[tag]], rtol=1e-6, err_msg=tag)


def test_without_tensorboard_the_loss_rows_stay_and_one_warning_says_why(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as if not installed
    monkeypatch.setattr(runlog, "_warned_no_tensorboard", False)
    with caplog.at_level(logging.WARNING, logger="mamikit"):
        for name in ("a", "b"):
            (tmp_path / name).mkdir()
            log = TrainingLog(tmp_path / name, "02", 0, {"step": 0}, resume=False)
            log.add_batch({"loss": torch.tensor(1.0), "Task_A/bce": torch.tensor(0.5)}, 1e-3)
            log.add_batch({"loss": torch.tensor(3.0)}, 1e-3)
            log.end_window(2, 0)
            assert log.scores(2) == 0
            log.close()
    assert caplog.text.count("tensorboard is not installed") == 1
    row = _rows(tmp_path / "b")[0]
    assert row["terms"] == {"loss": 2.0, "Task_A/bce": 0.5} and row["batches"] == 2 and row["step"] == 2
    assert not (tmp_path / "b" / "tensorboard").exists()


def test_read_and_plot_curves_one_line_per_experiment_and_seed(spied_run, tmp_path):
    run, _ = spied_run
    frame = read_curves(run.parent)
    assert {"loss/total", "lr", "score/dev/Task_A", "score/dev/Task_B/shaming"} <= set(frame["curve"])
    assert set(frame["label"]) == {"30-seed0"}
    dev = frame[frame["curve"] == "score/dev/Task_A"]
    assert dev["step"].is_monotonic_increasing and len(dev) == SMALL["epochs"] * SMALL["evals_per_epoch"]
    fig = plot_curves([run.parent, run.parent], metric=["loss/total", "score/dev/Task_A"], smooth=2,
                      path=tmp_path / "c.png")
    assert len(fig.axes) == 2 and [len(ax.lines) for ax in fig.axes] == [2, 2]  # smoothed, and faint behind it
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["30"]
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG" and (tmp_path / "c.pdf").read_bytes()[:4] == b"%PDF"
    # two epochs of two evaluations each: the epoch ends at 1 and 2 on the epoch axis
    dev = fig.axes[1].lines[1]
    np.testing.assert_allclose(dev.get_xdata()[[1, 3]], [1.0, 2.0])
    assert 0 < dev.get_xdata()[0] < 1 < dev.get_xdata()[2] < 2
    with pytest.raises(MamikitError, match="no curve score/dev/Nope"):
        plot_curves(frame, metric="score/dev/Nope")


def _write_curves(root, experiment: str, seed: int, n_steps: int = 20, per_epoch: int = 10, config: bool = True):
    """A run's log.jsonl (loss rows every 2 steps, dev scores every 5) and, optionally, its config.json."""
    from mamikit.experiments import PAPER_EXPERIMENTS

    run = root / f"{experiment}-seed{seed}"
    run.mkdir(parents=True)
    rng = np.random.default_rng([int(experiment), seed])
    rows = []
    for step in range(1, n_steps + 1):
        common = {"experiment": experiment, "seed": seed, "epoch": (step - 1) // per_epoch, "step": step}
        if step % 2 == 0:
            rows.append({"kind": "loss", **common, "lr": 1e-4, "batches": 2,
                         "terms": {"loss": float(1 / step + rng.normal(0, 0.05))}})
        if step % 5 == 0:
            rows.append({**common, "split": "dev", "task": "Task_A", "label": None, "metric": "score",
                         "value": float(0.5 + step / 100 + rng.normal(0, 0.03))})
    (run / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if config:
        import dataclasses

        (run / "config.json").write_text(json.dumps({"experiment": dataclasses.asdict(PAPER_EXPERIMENTS[experiment])}))
    return run


def test_curves_name_axes_and_legend_for_a_reader(tmp_path, caplog):
    for experiment in ("02", "10", "13"):
        _write_curves(tmp_path, experiment, 0)
    _write_curves(tmp_path, "12", 0, config=False)  # the registry describes it
    _write_curves(tmp_path, "12", 1, config=False)
    with caplog.at_level(logging.WARNING, logger="mamikit"):
        fig = plot_curves(tmp_path, metric=("loss/total", "score/dev/Task_A"))
    assert "config.json" not in caplog.text
    loss, dev = fig.axes
    assert [ax.get_xlabel() for ax in fig.axes] == ["epoch", "epoch"]
    assert loss.get_ylabel() == "loss" and dev.get_ylabel() == "Task_A score"
    assert loss.get_title() == "training loss" and dev.get_title() == "Task_A score on dev"
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend == ["02", "10: Proj Algn", "12: Contrastive, seed 0", "12: Contrastive, seed 1",
                      "13: Proj Algn, Contrastive"]
    assert [line.get_label() for line in dev.lines] == legend  # one line per run, each in the legend
    # loss rows every 2 steps of 10-step epochs: step s sits at s / 10 epochs
    np.testing.assert_allclose(loss.lines[0].get_xdata(), np.arange(2, 21, 2) / 10)
    fig = plot_curves(tmp_path, metric="score/dev/Task_A", experiments=["02", "10"], x="step",
                      labels={"02": "baseline"})
    assert fig.axes[0].get_xlabel() == "step (batches)" and list(fig.axes[0].lines[0].get_xdata()) == [5, 10, 15, 20]
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["baseline", "10"]  # 10 alone: its name
    with pytest.raises(MamikitError, match="x must be"):
        plot_curves(tmp_path, x="batch")


def test_epoch_axis_of_a_run_still_going_takes_the_last_full_epochs_length(tmp_path):
    _write_curves(tmp_path, "02", 0, n_steps=25, per_epoch=10)  # in its third epoch
    _write_curves(tmp_path, "10", 0, n_steps=6, per_epoch=10)  # in its first epoch: no full one yet
    frame = read_curves(tmp_path)
    x = curves.epoch_positions(frame)
    loss = frame["curve"] == "loss/total"
    first, second = loss & (frame["experiment"] == "02"), loss & (frame["experiment"] == "10")
    np.testing.assert_allclose(x[first], frame.loc[first, "step"] / 10)
    np.testing.assert_allclose(x[second], frame.loc[second, "step"] / 6)  # its last step counts as its end


def _ema(values, weight):
    """Exponential moving average, one value at a time."""
    out, last = [], None
    for v in values:
        last = v if last is None else weight * last + (1 - weight) * v
        out.append(last)
    return out


def test_smoothing_draws_an_ema_over_the_logged_line(tmp_path):
    _write_curves(tmp_path, "02", 0, n_steps=40)
    raw = read_curves(tmp_path).query("curve == 'loss/total'")["value"].to_numpy()
    plain = plot_curves(tmp_path, metric="loss/total")
    assert len(plain.axes[0].lines) == 1 and list(plain.axes[0].lines[0].get_ydata()) == list(raw)
    fig = plot_curves(tmp_path, metric="loss/total", smooth=0.6)
    faint, smoothed = fig.axes[0].lines
    assert list(faint.get_ydata()) == list(raw) and faint.get_alpha() < 1 and smoothed.get_alpha() is None
    np.testing.assert_allclose(smoothed.get_ydata(), _ema(raw, 0.6), rtol=1e-12)
    assert not np.allclose(smoothed.get_ydata(), raw)
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["02"]  # the faint line has no legend entry
    window = plot_curves(tmp_path, metric="loss/total", smooth=3).axes[0].lines[1].get_ydata()
    np.testing.assert_allclose(window, [np.mean(raw[max(0, i - 2):i + 1]) for i in range(len(raw))], rtol=1e-12)
    for bad in (-0.5, 2.5):
        with pytest.raises(MamikitError, match="smooth="):
            plot_curves(tmp_path, metric="loss/total", smooth=bad)


def _bold_cells(html: str) -> set[tuple[int, int]]:
    """(row, column) of the cells a Styler's CSS rules make bold."""
    cells = set()
    for selectors, body in re.findall(r"([^{}]+)\{([^}]*)\}", html):
        if "font-weight: bold" in body:
            cells |= {(int(r), int(c)) for r, c in re.findall(r"row(\d+)_col(\d+)", selectors)}
    return cells


def test_styled_table_highlights_each_score_rows_best_experiment():
    config = pd.DataFrame({"02": ["Multi"], "10": ["Multi"]}, index=["Transformer Encoder"])
    mean = pd.DataFrame({"02": [0.70, 0.61, np.nan], "10": [0.68, 0.65, np.nan]},
                        index=["Test - Task_A", "Test - Task_B", "Dev - Task_A"])
    table = analysis.ExperimentTable(config=config, mean=mean, std=mean * np.nan, runs=pd.Series({"02": 1, "10": 1}))
    html = styled_table(table).to_html()
    frame = table.to_frame()
    best = {(frame.index[r], frame.columns[c]) for r, c in _bold_cells(html)}
    assert best == {("Test - Task_A", "02"), ("Test - Task_B", "10")}
    plain = pd.DataFrame({"x": [1.0, 5.0], "y": [2.0, 3.0]})
    html = styled_table(plain, higher_is_better=False).to_html()
    assert _bold_cells(html) == {(0, 0), (1, 1)}


def test_the_round_bar_counts_trained_runs_only(tmp_path, monkeypatch, capsys):
    done = {"00-seed0"}
    monkeypatch.setattr(rounds, "_skip", lambda root, run, *a, **k: rounds.RunResult(run, tmp_path, "complete")
                        if run.name in done else None)
    monkeypatch.setattr(rounds, "_train_one",
                        lambda run, *a, **k: rounds.RunResult(run, tmp_path / run.name, "trained", 1.0))
    dirs = rounds.run_round(1, tmp_path, tmp_path, tmp_path, progress=True)
    n = len(rounds.round_runs(1))
    assert len(dirs) == n
    err = capsys.readouterr().err
    assert re.search(rf"round 1: 100%.*\b{n - 1}/{n - 1} \[", err.replace("\r", "\n")), err[-300:]
