"""One settings source (mamikit.settings), the store's profile check, local checkpoints, round reuse by settings."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

import mamikit as mk
from mamikit.checkpoints import local_last_dir
from mamikit.cli import main
from mamikit.notebooks import write_settings
from mamikit.rounds import RoundRun, plan, run_round
from mamikit.runs import run_is_complete
from mamikit.settings import PROFILE_TRAINING, SETTINGS_ENV
from mamikit.train import TrainConfig, train
from mamikit.utils import MamikitError

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(epochs=1, evals_per_epoch=2, accumulation=2, eval_batch_size=32, device="cpu")


# ----------------------------------------------------------------------------- Settings


def test_paper_profile_trains_as_section_4_unless_a_value_is_set():
    paper = mk.Settings(profile="paper").train_config(seed=2)
    default = TrainConfig()
    assert (paper.epochs, paper.evals_per_epoch, paper.accumulation, paper.lr, paper.batch_size) == \
        (None, 7, 20, 2e-4, 16) == (default.epochs, default.evals_per_epoch, default.accumulation, default.lr, default.batch_size)
    assert paper.seed == 2 and paper.checkpoint_every == default.checkpoint_every
    demo = mk.Settings().train_config()
    assert (demo.epochs, demo.evals_per_epoch, demo.accumulation, demo.lr) == (3, 2, 1, 1e-3)
    mixed = mk.Settings(profile="paper", epochs=3, lr=1e-4, amp=True).train_config()
    assert (mixed.epochs, mixed.lr, mixed.accumulation, mixed.amp) == (3, 1e-4, 20, True)  # explicit values win
    assert "epochs" not in mk.Settings(profile="paper").train_overrides()  # the experiment's own: 30 for experiment 30
    assert set(PROFILE_TRAINING["paper"]) == set(PROFILE_TRAINING["demo"])


def test_settings_file_then_keyword_values_and_paths(tmp_path, monkeypatch):
    s = mk.Settings(profile="paper", weights="random", run_root=str(tmp_path / "r"), seeds=[3, 1], accumulation=4)
    path = s.save(tmp_path / "settings.json")
    assert json.loads(path.read_text())["seeds"] == [3, 1]
    assert mk.load_settings(path) == s
    over = mk.load_settings(path, profile=None, accumulation=8, seeds=[0])  # None keeps the file's value
    assert (over.profile, over.accumulation, over.seeds) == ("paper", 8, (0,))
    assert over.runs == tmp_path / "r" / "runs" and over.report == tmp_path / "r" / "report"
    assert over.get_profile().weights == "random" and over.get_profile().clip_model == "RN50x4"
    monkeypatch.setenv(SETTINGS_ENV, str(path))
    assert mk.load_settings().accumulation == 4  # no path: $MAMIKIT_SETTINGS
    monkeypatch.delenv(SETTINGS_ENV)
    assert mk.load_settings() == mk.Settings() and mk.Settings().data_root == "runs/demo/data"
    assert mk.Settings(profile="paper").features_root == "runs/paper/features"


def test_bad_settings_are_named(tmp_path):
    bad = tmp_path / "s.json"
    bad.write_text(json.dumps({"profile": "paper", "epoch": 3}))
    with pytest.raises(MamikitError, match=r"s\.json: unknown setting 'epoch'"):
        mk.load_settings(bad)
    bad.write_text(json.dumps({"profile": "large"}))
    with pytest.raises(MamikitError, match=r"s\.json: .*profile must be one of"):
        mk.load_settings(bad)
    with pytest.raises(MamikitError, match="settings file not found"):
        mk.load_settings(tmp_path / "missing.json")
    with pytest.raises(MamikitError, match="accumulation must be a positive integer"):
        mk.Settings(accumulation=0)
    with pytest.raises(MamikitError, match="unknown setting 'epoch'"):
        mk.load_settings(None, epoch=3)


def test_notebook_parameters_become_the_settings_file(tmp_path):
    params = {"PROFILE": "paper", "SEEDS": [0, 1], "EPOCHS": None, "ACCUMULATION": 20, "RUN_ROOT": str(tmp_path),
              "DATA_ROOT": str(tmp_path / "data"), "AMP": True, "SYNTH_MAMI": 480}
    settings = mk.load_settings(write_settings(tmp_path, params))
    assert (settings.profile, settings.seeds, settings.epochs, settings.amp, settings.data_root) == \
        ("paper", (0, 1), None, True, str(tmp_path / "data"))
    assert (tmp_path / "settings.json").is_file()


def test_cli_settings_file_and_given_options(tmp_path, tiny_data, tiny_store):
    settings = mk.Settings(data_root=str(tiny_data), features_root=str(tiny_store), run_root=str(tmp_path),
                           epochs=1, evals_per_epoch=1, lr=5e-4, device="cpu").save(tmp_path / "s.json")
    out = tmp_path / "run"
    assert main(["train", "--experiment", "20", "--settings", str(settings), "--out", str(out), "--lr", "1e-3"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["train"]["lr"] == 1e-3  # given on the command line
    assert (config["train"]["epochs"], config["train"]["accumulation"], config["train"]["evals_per_epoch"]) == (1, 1, 1)
    assert main(["train", "--experiment", "20", "--out", str(tmp_path / "x")]) == 2  # neither --data nor --settings


# ----------------------------------------------------------------------------- the store's profile and weights


def test_train_refuses_a_store_of_another_profile_or_weights(tiny_data, tiny_store, tmp_path, capsys):
    with pytest.raises(MamikitError, match=r"built with the demo profile; this run asks for the paper profile"):
        train("20", tiny_data, tiny_store, tmp_path / "a", profile=mk.get_profile("paper", weights="random"),
              train_cfg=TrainConfig(**SMALL), progress=False)
    with pytest.raises(MamikitError, match=r"clip features were extracted with weights None; this run asks for 'random \(seed 0\)'"):
        train("20", tiny_data, tiny_store, tmp_path / "b", profile=mk.get_profile("demo", weights="random"),
              train_cfg=TrainConfig(**SMALL), progress=False)
    assert not (tmp_path / "a" / "config.json").exists() and not (tmp_path / "b" / "config.json").exists()  # refused first


# ----------------------------------------------------------------------------- the resumable checkpoint on local disk


def test_last_checkpoint_stays_local_between_copies_and_resume_uses_the_newest(tiny_data, tiny_store, tmp_path):
    cfg = TrainConfig(**dict(SMALL, epochs=2, checkpoint_every=3, local_dir=str(tmp_path / "local"), keep_weights="last"))
    full = train("20", tiny_data, tiny_store, tmp_path / "full", train_cfg=TrainConfig(**dict(SMALL, epochs=2, checkpoint_every=1)),
                 progress=False)
    run = tmp_path / "part"
    local = local_last_dir(run, cfg.local_dir)
    train("20", tiny_data, tiny_store, run, train_cfg=cfg, progress=False, stop_after_evals=2)
    assert not (run / "checkpoints" / "last").exists()  # 2 evaluations < 3: nothing copied to the run folder yet
    assert json.loads((local / "state.json").read_text())["step"] > 0
    train("20", tiny_data, tiny_store, run, train_cfg=cfg, progress=False, resume=True, stop_after_evals=3)
    copied = json.loads((run / "checkpoints" / "last" / "state.json").read_text())
    assert copied["evals"] == 3 and copied == json.loads((local / "state.json").read_text())  # the 3rd evaluation's copy
    train("20", tiny_data, tiny_store, run, train_cfg=cfg, progress=False, resume=True)
    assert (run / "log.jsonl").read_bytes() == (full / "log.jsonl").read_bytes()  # resumed from local, as if never stopped
    assert run_is_complete(run) and not local.parent.exists()  # the local copy is gone once the run is finished
    from safetensors import safe_open

    with safe_open(str(run / "checkpoints" / "last" / "weights.safetensors"), framework="pt") as fh:
        assert not any(k.startswith("__") for k in fh.keys())  # noqa: SIM118 -- a finished run keeps the weights only


def test_resume_on_a_new_machine_uses_the_run_folders_copy(tiny_data, tiny_store, tmp_path):
    cfg = TrainConfig(**dict(SMALL, epochs=2, checkpoint_every=2, local_dir=str(tmp_path / "local")))
    run = train("20", tiny_data, tiny_store, tmp_path / "run", train_cfg=cfg, progress=False, stop_after_evals=3)
    import shutil

    shutil.rmtree(tmp_path / "local")  # the VM is gone; the run folder holds the copy of the 2nd evaluation
    train("20", tiny_data, tiny_store, run, train_cfg=cfg, progress=False, resume=True)
    rows = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    steps = sorted({row["step"] for row in rows if "kind" not in row})  # evaluation rows (loss rows carry a kind)
    assert len(steps) == 4 and run_is_complete(run)


# ----------------------------------------------------------------------------- rounds: reuse by settings, experiment 30 in two stages


def test_round_4_trains_experiment_30_as_a_continued_run():
    first, second = plan(RoundRun(4, "30", 2), "runs")
    assert (first.run_dir.name, second.run_dir.name) == ("30-stage1-seed2", "30-seed2")
    assert first.experiment.name == "30-stage1" and second.experiment.name == "30"
    assert first.train_cfg.epochs == second.train_cfg.epochs == 15 and first.train_cfg.init_from is None
    assert Path(second.train_cfg.init_from) == first.run_dir.resolve() and second.train_cfg.seed == 2
    scaled = plan(RoundRun(4, "30", 0), "runs", {"epochs": 4})
    assert [s.train_cfg.epochs for s in scaled] == [4, 4]  # 30 trains twice a 15-epoch experiment's count
    single = plan(RoundRun(4, "30", 0), "runs", {"epochs": 4}, single_stage=True)
    assert [(s.run_dir.name, s.train_cfg.epochs) for s in single] == [("30-seed0", 8)]
    assert len(plan(RoundRun(4, "10", 0), "runs")) == 1


def test_round_reuses_only_runs_with_the_same_settings(tiny_data, tiny_store, tmp_path):
    small = dict(SMALL, evals_per_epoch=1)
    results = []
    run_round(4, tiny_data, tiny_store, tmp_path, train_overrides=small, progress=False, results=results)
    assert [(r.run.name, r.state) for r in results] == [("10-seed0", "trained"), ("30-seed0", "trained")]
    stage1, final = tmp_path / "round4" / "30-stage1-seed0", tmp_path / "round4" / "30-seed0"
    assert run_is_complete(stage1) and run_is_complete(final)
    # stage 1 keeps the last weights stage 2 started from; the reported run, its official best (the default)
    assert [p.parent.name for p in (stage1 / "checkpoints").glob("*/weights.safetensors")] == ["last"]
    assert [p.parent.name for p in (final / "checkpoints").glob("*/weights.safetensors")] == ["best-Task_A"]
    config = json.loads((final / "config.json").read_text())
    assert Path(config["train"]["init_from"]) == stage1.resolve() and config["experiment"]["recipe"] == "paper"

    again = []
    run_round(4, tiny_data, tiny_store, tmp_path, train_overrides=dict(small, device="auto"), progress=False, results=again)
    assert [r.state for r in again] == ["complete", "complete"]  # the device is not a setting of the run
    before = (final / "log.jsonl").read_bytes()
    changed = []
    dirs = run_round(4, tiny_data, tiny_store, tmp_path, train_overrides=dict(small, lr=1e-3), progress=False,
                     results=changed, recipe="authors")
    assert [r.state for r in changed] == ["changed", "changed"] and dirs == []
    assert "train.lr" in changed[1].error and "experiment.recipe" in changed[1].error and "30-stage1-seed0" in changed[1].error
    assert (final / "log.jsonl").read_bytes() == before  # left alone
    rerun = []
    run_round(4, tiny_data, tiny_store, tmp_path, train_overrides=dict(small, lr=1e-3), progress=False, results=rerun,
              seeds=[0], recipe="authors", rerun_changed=True, shard="1/2")
    assert [(r.run.name, r.state) for r in rerun] == [("30-seed0", "trained")]
    assert json.loads((final / "config.json").read_text())["experiment"]["recipe"] == "authors"


def test_gpu_check_without_cuda_says_so_and_exits_0():
    env = {"CUDA_VISIBLE_DEVICES": "", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py")], capture_output=True, text=True, env=env,
                         timeout=120)
    assert out.returncode == 0
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {
        "cuda": False, "message": "no CUDA device here: nothing to check (--cpu runs a CPU smoke test)"}
