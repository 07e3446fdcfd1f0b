"""One settings source (mamikit.settings), the store's profile check, local checkpoints, round reuse by settings."""

import dataclasses
import itertools
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
from mamikit.settings import SETTINGS_ENV, TRAINING_PRESETS, Settings, settings_fields
from mamikit.train import TrainConfig, train
from mamikit.utils import MamikitError

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(epochs=1, evals_per_epoch=2, accumulation=2, eval_batch_size=32, device="cpu")


# ----------------------------------------------------------------------------- Settings


def test_paper_profile_trains_as_section_4_unless_a_value_is_set():
    paper = mk.Settings(profile="paper").train_config(seed=2)
    assert (paper == dataclasses.replace(TrainConfig(), seed=2)
            == dataclasses.replace(TRAINING_PRESETS["paper"], seed=2))
    assert ((paper.epochs, paper.evals_per_epoch, paper.accumulation, paper.lr, paper.batch_size)
            == (None, 7, 20, 2e-4, 16))
    demo = mk.Settings().train_config()
    assert (demo.epochs, demo.evals_per_epoch, demo.accumulation, demo.lr) == (3, 2, 1, 1e-3)
    mixed = mk.Settings(profile="paper", train={"epochs": 3, "lr": 1e-4, "amp": True}).train_config()
    assert (mixed.epochs, mixed.lr, mixed.accumulation, mixed.amp) == (3, 1e-4, 20, True)  # explicit values win
    assert mk.load_settings(profile="paper", epochs=3, lr=1e-4, amp=True).train == mixed  # flat names, same values
    overrides = mk.Settings(profile="paper").train_overrides()
    assert "epochs" not in overrides and "seed" not in overrides  # the experiment's own; each run's own
    assert mk.Settings(train=TrainConfig(lr=1.0)).train == TrainConfig(lr=1.0)  # a whole TrainConfig is taken as given


def test_one_home_per_value():
    """Settings holds paths and one TrainConfig: no field of one is a field of the other, nor of the model's."""
    from mamikit.experiments import Experiment
    from mamikit.model import ModelConfig
    from mamikit.profiles import Profile

    # Settings picks registry entries by name: its profile and weights choose the Profile (which a ModelConfig
    # holds), its recipe the Experiment's; the entries record the names they were picked by.
    selectors = {"name", "recipe", "weights", "profile"}
    names = {cls: {f.name for f in dataclasses.fields(cls)} - selectors
             for cls in (Settings, TrainConfig, Experiment, ModelConfig, Profile)}
    # TrainConfig.epochs is a scale on the experiment's own length (None keeps 15, or 30 for experiment 30)
    names[TrainConfig].discard("epochs")
    for a, b in itertools.combinations(names, 2):
        assert not names[a] & names[b], (a.__name__, b.__name__, names[a] & names[b])
    assert set(settings_fields()) == ((names[Settings] - {"train"}) | names[TrainConfig]
                                      | {"profile", "recipe", "weights", "epochs"})


def test_a_settings_file_keeps_what_differs_from_the_preset(tmp_path):
    path = mk.load_settings(profile="demo", epochs=5, lr=1e-3).save(tmp_path / "s.json")
    assert json.loads(path.read_text())["train"] == {"epochs": 5}  # lr 1e-3 is the demo preset's
    assert mk.load_settings(path).train == dataclasses.replace(TRAINING_PRESETS["demo"], epochs=5)
    # the same file under the paper profile: the paper's preset, with the one value it names
    assert mk.load_settings(path, profile="paper").train == dataclasses.replace(TrainConfig(), epochs=5)
    old = tmp_path / "old.json"  # files written before the training values were grouped: flat names
    old.write_text(json.dumps({"profile": "paper", "accumulation": 4, "device": "cpu"}))
    assert (mk.load_settings(old).train.accumulation, mk.load_settings(old).train.device) == (4, "cpu")


def test_settings_file_then_keyword_values_and_paths(tmp_path, monkeypatch):
    s = mk.Settings(profile="paper", weights="random", run_root=str(tmp_path / "r"), seeds=[3, 1],
                    train={"accumulation": 4})
    path = s.save(tmp_path / "settings.json")
    assert json.loads(path.read_text())["seeds"] == [3, 1]
    assert mk.load_settings(path) == s
    over = mk.load_settings(path, profile=None, accumulation=8, seeds=[0])  # None keeps the file's value
    assert (over.profile, over.train.accumulation, over.seeds) == ("paper", 8, (0,))
    assert over.runs == tmp_path / "r" / "runs" and over.report == tmp_path / "r" / "report"
    assert over.get_profile().weights == "random" and over.get_profile().clip_model == "RN50x4"
    monkeypatch.setenv(SETTINGS_ENV, str(path))
    assert mk.load_settings().train.accumulation == 4  # no path: $MAMIKIT_SETTINGS
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
    bad.write_text(json.dumps({"train": {"lr": "fast"}}))
    with pytest.raises(MamikitError, match=r"s\.json: .*lr must be a number, got 'fast'"):
        mk.load_settings(bad)
    with pytest.raises(MamikitError, match="settings file not found"):
        mk.load_settings(tmp_path / "missing.json")
    with pytest.raises(MamikitError, match="accumulation must be a positive integer"):
        mk.load_settings(accumulation=0)
    with pytest.raises(MamikitError, match="unknown setting 'epoch'"):
        mk.load_settings(None, epoch=3)
    with pytest.raises(MamikitError, match="keep_weights must be one of"):
        TrainConfig(keep_weights="some")


def test_notebook_settings_become_the_settings_file(tmp_path):
    values = {"profile": "paper", "seeds": [0, 1], "accumulation": 20, "amp": True}
    settings = mk.load_settings(write_settings(tmp_path, values))
    assert ((settings.profile, settings.seeds, settings.train.epochs, settings.train.amp)
            == ("paper", (0, 1), None, True))
    assert settings.data_root == str(tmp_path / "data") and (tmp_path / "settings.json").is_file()


def test_every_field_is_an_option_of_train_and_round():
    from mamikit.cli import build_parser

    parser = build_parser()
    for command, excluded in (("train", {"seeds", "run_root"}), ("round", {"seed", "init_from", "run_root"})):
        sub = next(a for a in parser._subparsers._group_actions).choices[command]
        dests = {a.dest for a in sub._actions}
        assert (set(settings_fields()) - excluded) <= dests, command
    args = parser.parse_args(["round", "--round", "1", "--warmup-fraction", "0.2", "--no-amp", "--seeds", "0,2"])
    assert (args.warmup_fraction, args.amp, args.seeds, args.lr) == (0.2, False, [0, 2], None)


def test_a_profile_trains_the_same_from_the_cli_the_python_api_and_a_notebook(tmp_path, tiny_data, tiny_store):
    """The demo profile's training values reach config.json alike from all three entry points."""
    from mamikit.notebooks import run_notebooks

    paths = dict(data_root=str(tiny_data), features_root=str(tiny_store))
    given = dict(epochs=1, device="cpu", seeds=[0])  # kept short; every other value is the demo preset's
    # the CLI
    cli = tmp_path / "cli"
    assert main(["train", "--experiment", "00", "--profile", "demo", "--data", str(tiny_data), "--features",
                 str(tiny_store), "--epochs", "1", "--device", "cpu", "--out", str(cli)]) == 0
    # the Python API
    settings = mk.load_settings(profile="demo", run_root=str(tmp_path / "api"), **paths, **given)
    api = mk.run_experiment("00", settings, round_no=1)[0]
    # notebook 03's settings cells, with the settings given as a notebook's OVERRIDES
    nb_root = tmp_path / "nb"
    write_settings(nb_root, dict(profile="demo", **paths))
    notebook = _notebook_settings(ROOT / "notebooks" / "03_round1_encoders_pooling.ipynb",
                                  SETTINGS=str(nb_root / "settings.json"),
                                  OVERRIDES=dict(given, run_root=str(nb_root)))
    nb_run = mk.run_experiment("00", notebook, round_no=1)[0]
    recorded = [json.loads((run / "config.json").read_text())["train"] for run in (cli, api, nb_run)]
    assert recorded[0] == recorded[1] == recorded[2]
    preset = TRAINING_PRESETS["demo"]
    assert (recorded[0]["evals_per_epoch"], recorded[0]["accumulation"], recorded[0]["lr"]) == \
        (preset.evals_per_epoch, preset.accumulation, preset.lr) != (7, 20, 2e-4)


def test_cli_settings_file_and_given_options(tmp_path, tiny_data, tiny_store, monkeypatch):
    settings = mk.load_settings(data_root=str(tiny_data), features_root=str(tiny_store), run_root=str(tmp_path),
                                epochs=1, evals_per_epoch=1, lr=5e-4, device="cpu").save(tmp_path / "s.json")
    out = tmp_path / "run"
    assert main(["train", "--experiment", "20", "--settings", str(settings), "--out", str(out), "--lr", "1e-3"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["train"]["lr"] == 1e-3  # given on the command line
    assert ((config["train"]["epochs"], config["train"]["accumulation"], config["train"]["evals_per_epoch"])
            == (1, 1, 1))
    # no --settings and no --data: the settings' default data folder (relative: here, where none is), named in
    # the error
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--experiment", "20", "--features", str(tiny_store), "--out", str(tmp_path / "x")]) == 2


def _notebook_settings(path, **parameters):
    """Run a notebook's parameters cell (with papermill's injected values after it) and its settings cell."""
    import nbformat

    code = [c.source for c in nbformat.read(str(path), as_version=4).cells if c.cell_type == "code"]
    namespace: dict = {}
    exec(code[1], namespace)
    namespace.update(parameters)
    exec("\n".join(line for line in code[2].splitlines() if not line.startswith("%")), namespace)
    return namespace["settings"]


# ----------------------------------------------------------------------------- the store's profile and weights


def test_train_refuses_a_store_of_another_profile_or_weights(tiny_data, tiny_store, tmp_path, capsys):
    with pytest.raises(MamikitError, match=r"built with the demo profile; this run asks for the paper profile"):
        train("20", tiny_data, tiny_store, tmp_path / "a", profile=mk.get_profile("paper", weights="random"),
              train_cfg=TrainConfig(**SMALL), progress=False)
    with pytest.raises(MamikitError,
                       match=r"clip features were extracted with weights None; this run asks for 'random \(seed 0\)'"):
        train("20", tiny_data, tiny_store, tmp_path / "b", profile=mk.get_profile("demo", weights="random"),
              train_cfg=TrainConfig(**SMALL), progress=False)
    # refused first
    assert not (tmp_path / "a" / "config.json").exists() and not (tmp_path / "b" / "config.json").exists()


# ----------------------------------------------------------------------------- the resumable checkpoint on local disk


def test_last_checkpoint_stays_local_between_copies_and_resume_uses_the_newest(tiny_data, tiny_store, tmp_path):
    cfg = TrainConfig(**dict(SMALL, epochs=2, checkpoint_every=3, local_dir=str(tmp_path / "local"),
                             keep_weights="last"))
    full = train("20", tiny_data, tiny_store, tmp_path / "full",
                 train_cfg=TrainConfig(**dict(SMALL, epochs=2, checkpoint_every=1)), progress=False)
    run = tmp_path / "part"
    local = local_last_dir(run, cfg.local_dir)
    train("20", tiny_data, tiny_store, run, train_cfg=cfg, progress=False, stop_after_evals=2)
    assert not (run / "checkpoints" / "last").exists()  # 2 evaluations < 3: nothing copied to the run folder yet
    assert json.loads((local / "state.json").read_text())["step"] > 0
    train("20", tiny_data, tiny_store, run, train_cfg=cfg, progress=False, resume=True, stop_after_evals=3)
    copied = json.loads((run / "checkpoints" / "last" / "state.json").read_text())
    # the 3rd evaluation's copy
    assert copied["evals"] == 3 and copied == json.loads((local / "state.json").read_text())
    train("20", tiny_data, tiny_store, run, train_cfg=cfg, progress=False, resume=True)
    # resumed from local, as if never stopped
    assert (run / "log.jsonl").read_bytes() == (full / "log.jsonl").read_bytes()
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


# -------------------------------------------------------------- rounds: reuse by settings, experiment 30 in two stages


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
    run_round(4, tiny_data, tiny_store, tmp_path, train_overrides=dict(small, device="auto"), progress=False,
              results=again)
    assert [r.state for r in again] == ["complete", "complete"]  # the device is not a setting of the run
    before = (final / "log.jsonl").read_bytes()
    changed = []
    dirs = run_round(4, tiny_data, tiny_store, tmp_path, train_overrides=dict(small, lr=1e-3), progress=False,
                     results=changed, recipe="authors")
    assert [r.state for r in changed] == ["changed", "changed"] and dirs == []
    assert ("train.lr" in changed[1].error and "experiment.recipe" in changed[1].error
            and "30-stage1-seed0" in changed[1].error)
    assert (final / "log.jsonl").read_bytes() == before  # left alone
    rerun = []
    run_round(4, tiny_data, tiny_store, tmp_path, train_overrides=dict(small, lr=1e-3), progress=False, results=rerun,
              seeds=[0], recipe="authors", rerun_changed=True, shard="1/2")
    assert [(r.run.name, r.state) for r in rerun] == [("30-seed0", "trained")]
    assert json.loads((final / "config.json").read_text())["experiment"]["recipe"] == "authors"


def test_gpu_check_without_cuda_says_so_and_exits_0():
    env = {"CUDA_VISIBLE_DEVICES": "", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py")], capture_output=True, text=True,
                         env=env, timeout=120)
    assert out.returncode == 0
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {
        "cuda": False, "message": "no CUDA device here: nothing to check (--cpu runs a CPU smoke test)"}
