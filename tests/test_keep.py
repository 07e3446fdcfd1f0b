"""Which weights a finished run keeps (TrainConfig.keep_weights), and where best checkpoints go while it trains."""

import json
import shutil

import pytest

import mamikit as mk
from mamikit.checkpoints import checkpoint_step, kept_checkpoints, local_checkpoints_dir, run_folder_bytes
from mamikit.cli import main
from mamikit.rounds import RoundRun, plan, settings_differences
from mamikit.runs import load_run, run_is_complete
from mamikit.train import TrainConfig, run_settings, train
from mamikit.utils import MamikitError

# 4 evaluations; copies into the run folder after the 3rd, and at the end
SMALL = dict(epochs=2, evals_per_epoch=2, accumulation=2, eval_batch_size=32, device="cpu", checkpoint_every=3)


def _weights(run):
    """The checkpoint folders of a run folder that hold weights."""
    return sorted(p.parent.name for p in (run / "checkpoints").glob("*/weights.safetensors"))


def _cfg(tmp_path, **kw):
    return TrainConfig(**dict(SMALL, local_dir=str(tmp_path / "local"), **kw))


@pytest.fixture(scope="module")
def default_run(tiny_data, tiny_store, tmp_path_factory):
    """Experiment 20 trained to the end with the default keep_weights ("best")."""
    root = tmp_path_factory.mktemp("keep")
    return train("20", tiny_data, tiny_store, root / "run", train_cfg=_cfg(root), progress=False)


def test_kept_checkpoints_per_value():
    tasks = ["MAMI", "Task_A", "Task_B", "Hateful"]
    assert kept_checkpoints("best", tasks) == {"best-Task_A"}
    assert kept_checkpoints("last", tasks) == {"last"}
    assert kept_checkpoints("best+last", tasks) == {"best-Task_A", "last"}
    assert kept_checkpoints("all", tasks) == {"last", "best-MAMI", "best-Task_A", "best-Task_B", "best-Hateful"}
    with pytest.raises(MamikitError, match="keep_weights must be one of"):
        TrainConfig(keep_weights="none")
    with pytest.raises(MamikitError, match="keep_weights must be one of"):
        mk.load_settings(keep_weights="best-only")


def test_paper_budget_written_and_kept():
    w = 4 * 116_580_100  # experiment 30's trainable float32 parameters at the paper's sizes
    tasks = ["MAMI", "Task_A", "Task_B", "Hateful"]
    default = run_folder_bytes(w, 5 * w, tasks)
    assert default["kept"] == w < 600e6 and default["written"] == 2 * 5 * w + 3 * w < 10 * 2**30
    # today's set: 4 bests copied 3 times
    assert run_folder_bytes(w, 5 * w, tasks, "all")["written"] == 2 * 5 * w + w + 4 * 3 * w
    assert run_folder_bytes(w, 5 * w, tasks, "all")["kept"] == 5 * w
    assert run_folder_bytes(1, 5, tasks, "last", checkpoint_every=1) == {"written": 104 * 5 + 1, "kept": 1}
    # a best written at each evaluation
    assert run_folder_bytes(1, 5, tasks, "best", checkpoint_every=1)["written"] == 104 * 5 + 105
    # copies by time: not counted without the minutes an evaluation interval takes; with them, every 4 evaluations
    assert run_folder_bytes(w, 5 * w, tasks, checkpoint_minutes=10) == default
    timed = run_folder_bytes(1, 5, tasks, eval_minutes=3, checkpoint_minutes=10)
    assert timed["written"] == 104 // 4 * 5 + (104 // 4 + 1)
    assert run_folder_bytes(1, 5, tasks, eval_minutes=30, checkpoint_minutes=10) == \
        run_folder_bytes(1, 5, tasks, checkpoint_every=1)  # a copy at every evaluation (through local disk)


def test_a_finished_run_keeps_the_official_best_weights_and_a_state_record(default_run, tmp_path):
    run = default_run
    assert _weights(run) == ["best-Task_A"]
    state = json.loads((run / "checkpoints" / "last" / "state.json").read_text())
    assert state["complete"] and run_is_complete(run) and set(state["best"]) == {"MAMI", "Task_A", "Task_B"}
    assert not local_checkpoints_dir(run, str(run.parent / "local")).exists()
    for task in ("MAMI", "Task_A", "Task_B"):  # the small best predictions of every task stay, as the tables read them
        assert (run / "predictions" / f"best-{task}" / f"test__{task}.csv").is_file()
    assert (run / "answer" / "best" / "taskB" / "answer.txt").is_file()
    config = json.loads((run / "config.json").read_text())
    assert config["checkpoints"]["keep_weights"] == "best" and "keep_weights" not in config["train"]
    assert load_run(run, device="cpu").state["step"] == state["best"]["Task_A"]["step"]
    with pytest.raises(MamikitError) as err:
        load_run(run, "last", device="cpu")
    message = str(err.value)
    assert str(run) in message and "`last`" in message and "keep_weights='best'" in message
    assert "'last' or 'best+last' or 'all'" in message
    with pytest.raises(MamikitError,
                       match=r"best-Task_B` weights \(keep_weights='best'\); keep_weights 'all' keeps them"):
        load_run(run, task="Task_B", device="cpu")


def test_a_finished_run_without_last_weights_is_complete_on_resume(default_run, tiny_data, tiny_store, tmp_path,
                                                                   caplog):
    run = tmp_path / "copy"
    shutil.copytree(default_run, run)
    with caplog.at_level("INFO", logger="mamikit"):
        train("20", tiny_data, tiny_store, run, train_cfg=_cfg(tmp_path), progress=False, resume=True)
    assert "already complete" in caplog.text
    (run / "checkpoints" / "last" / "state.json").write_text('{"epoch": 2, "step": \x00garbage')
    with pytest.raises(MamikitError, match=r"checkpoints/last/state\.json: not valid JSON"):
        train("20", tiny_data, tiny_store, run, train_cfg=_cfg(tmp_path), progress=False, resume=True)


def test_init_from_a_run_without_last_weights_is_refused(default_run, tiny_data, tiny_store, tmp_path):
    cfg = TrainConfig(**dict(SMALL, epochs=1, init_from=str(default_run)))
    with pytest.raises(MamikitError, match=r"init_from needs last weights: the finished run kept no `last` weights"):
        train("20", tiny_data, tiny_store, tmp_path / "next", train_cfg=cfg, progress=False)
    assert not (tmp_path / "next" / "config.json").exists()  # refused before anything was written


def test_all_keeps_every_best_and_last_and_local_copies_equal_straight_writes(tiny_data, tiny_store, tmp_path):
    copied = train("20", tiny_data, tiny_store, tmp_path / "copied", train_cfg=_cfg(tmp_path, keep_weights="all"),
                   progress=False)
    straight = train("20", tiny_data, tiny_store, tmp_path / "straight",
                     train_cfg=TrainConfig(**dict(SMALL, checkpoint_every=1, keep_weights="all")), progress=False)
    assert _weights(copied) == _weights(straight) == ["best-MAMI", "best-Task_A", "best-Task_B", "last"]
    for name in _weights(straight):
        assert (copied / "checkpoints" / name / "weights.safetensors").read_bytes() == \
            (straight / "checkpoints" / name / "weights.safetensors").read_bytes(), name


def test_best_weights_stay_local_until_a_copy_point_and_a_new_machine_resumes(default_run, tiny_data, tiny_store,
                                                                              tmp_path):
    cfg = _cfg(tmp_path)
    run = tmp_path / "run"
    local = local_checkpoints_dir(run, cfg.local_dir)
    train("20", tiny_data, tiny_store, run, train_cfg=cfg, progress=False, stop_after_evals=2)
    # the other tasks' best weights: never written
    assert sorted(p.name for p in local.iterdir()) == ["best-Task_A", "last"]
    assert not (run / "checkpoints").exists()  # nothing in the run folder before the first copy point ...
    # ... but the best predictions, straight
    assert (run / "predictions" / "best-Task_B" / "test__Task_B.csv").is_file()
    train("20", tiny_data, tiny_store, run, train_cfg=cfg, progress=False, resume=True, stop_after_evals=3)
    assert _weights(run) == ["best-Task_A", "last"]
    assert checkpoint_step(run / "checkpoints" / "best-Task_A") == checkpoint_step(local / "best-Task_A")
    shutil.rmtree(local)  # the machine is gone: the run folder's copies go on
    train("20", tiny_data, tiny_store, run, train_cfg=cfg, progress=False, resume=True)
    assert run_is_complete(run) and _weights(run) == ["best-Task_A"]
    assert (run / "log.jsonl").read_bytes() == (default_run / "log.jsonl").read_bytes()
    best = "checkpoints/best-Task_A/weights.safetensors"
    assert (run / best).read_bytes() == (default_run / best).read_bytes()


def test_the_resumable_checkpoint_is_copied_once_checkpoint_minutes_have_passed(tiny_data, tiny_store, tmp_path):
    by_time = _cfg(tmp_path, checkpoint_every=100, checkpoint_minutes=1e-9)  # every evaluation is late
    run = train("20", tiny_data, tiny_store, tmp_path / "timed", train_cfg=by_time, progress=False,
                stop_after_evals=1)
    local = local_checkpoints_dir(run, by_time.local_dir) / "last"
    assert checkpoint_step(run / "checkpoints" / "last") == checkpoint_step(local) > 0
    config = json.loads((run / "config.json").read_text())
    assert config["checkpoints"]["minutes"] == 1e-9 and "checkpoint_minutes" not in config["train"]
    by_count = _cfg(tmp_path, checkpoint_every=100, checkpoint_minutes=None)
    run = train("20", tiny_data, tiny_store, tmp_path / "counted", train_cfg=by_count, progress=False,
                stop_after_evals=1)
    assert not (run / "checkpoints").exists()
    with pytest.raises(MamikitError, match="checkpoint_minutes must be a positive number or None, got 0"):
        TrainConfig(checkpoint_minutes=0)


def test_a_finish_killed_before_removing_the_resumable_weights_is_tidied(tiny_data, tiny_store, tmp_path):
    cfg = TrainConfig(**dict(SMALL, checkpoint_every=1))
    run = train("20", tiny_data, tiny_store, tmp_path / "run", train_cfg=cfg, progress=False, stop_after_evals=3)
    resumable = tmp_path / "resumable.safetensors"
    shutil.copyfile(run / "checkpoints" / "last" / "weights.safetensors", resumable)
    train("20", tiny_data, tiny_store, run, train_cfg=cfg, progress=False, resume=True)
    assert _weights(run) == ["best-Task_A"]
    shutil.copyfile(resumable, run / "checkpoints" / "last" / "weights.safetensors")  # as the kill left it
    train("20", tiny_data, tiny_store, run, train_cfg=cfg, progress=False, resume=True)
    assert run_is_complete(run) and _weights(run) == ["best-Task_A"]


def test_keep_weights_on_the_command_line_is_recorded_but_no_setting_of_the_run(tiny_data, tiny_store, tmp_path):
    out = tmp_path / "run"
    assert main(["train", "--experiment", "20", "--data", str(tiny_data), "--features", str(tiny_store),
                 "--out", str(out), "--epochs", "1", "--evals-per-epoch", "1", "--device", "cpu",
                 "--keep-weights", "last"]) == 0
    assert _weights(out) == ["last"]
    assert json.loads((out / "config.json").read_text())["checkpoints"]["keep_weights"] == "last"
    # the demo profile's training values (the CLI trained with them), asking for other kept weights
    wanted = mk.load_settings(profile="demo", epochs=1, evals_per_epoch=1, keep_weights="all").train_overrides()
    stage = plan(RoundRun(1, "20", 0), tmp_path, wanted)[0]
    assert stage.train_cfg.keep_weights == "all"
    # a round asking for other kept weights reuses the run: they change no score
    assert settings_differences(out, run_settings(stage.experiment, mk.get_profile("demo"), stage.train_cfg)) == []
    assert mk.load_settings(keep_weights="best+last").train_config().keep_weights == "best+last"


def test_round_4_stage_1_keeps_its_last_weights_for_stage_2():
    for wanted, first in (("best", "last"), ("last", "last"), ("best+last", "best+last"), ("all", "all")):
        stage1, stage2 = plan(RoundRun(4, "30", 0), "runs", {"keep_weights": wanted})
        assert (stage1.train_cfg.keep_weights, stage2.train_cfg.keep_weights) == (first, wanted)
    stage1, stage2 = plan(RoundRun(4, "30", 0), "runs")
    assert (stage1.train_cfg.keep_weights, stage2.train_cfg.keep_weights) == ("last", "best")
