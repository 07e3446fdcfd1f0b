"""A round spread over workers: shards, run-directory locks, provenance in config.json, runs as Ray tasks."""

import json
import shutil
import os
import signal
import socket
import subprocess
import sys
from collections import Counter
from datetime import datetime
from pathlib import Path

import pytest
import torch

from mamikit.checkpoints import STAGED
from mamikit.cli import main
from mamikit.experiments import ROUNDS
from mamikit.provenance import HOLDER_FILE, RunLock, RunLocked, lock_holder
from mamikit.profiles import get_profile
from mamikit.rounds import (RoundRun, parse_shard, plan, round_runs, run_dir_for, run_round, settings_differences,
                            shard, summary_table)
from mamikit.runs import run_is_complete
from mamikit.settings import load_settings
from mamikit.train import TrainConfig, train
from mamikit.utils import MamikitError

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(epochs=1, evals_per_epoch=1, accumulation=2, eval_batch_size=32, device="cpu")
HOLD = ("import sys; from mamikit.provenance import RunLock\nwith RunLock(sys.argv[1]):\n"
        "    print('held', flush=True)\n    sys.stdin.read()\n")


def _holder(run_dir: Path) -> subprocess.Popen:
    """Another process that locks `run_dir` until its stdin closes."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, env=env)
    assert proc.stdout.readline().strip() == "held"
    return proc


def _config(run_dir: Path) -> dict:
    return json.loads((run_dir / "config.json").read_text())


# ----------------------------------------------------------------------------- shards


@pytest.mark.parametrize("round_no", sorted(ROUNDS))
def test_shards_are_disjoint_complete_balanced_and_deterministic(round_no):
    for seeds in ([0], [0, 1], [0, 1, 2], [7, 2, 9, 1, 4]):
        runs = round_runs(round_no, seeds)
        assert len(runs) == len(set(runs)) == len(ROUNDS[round_no]) * len(seeds)
        for n in range(1, 6):
            shares = [shard(runs, k, n) for k in range(n)]
            assert Counter(r for s in shares for r in s) == Counter(runs)  # every run in exactly one shard
            assert max(map(len, shares)) - min(map(len, shares)) <= 1
            # a worker typing the seeds in another order gets the same share
            assert shares == [shard(round_runs(round_no, list(reversed(seeds))), k, n) for k in range(n)]


def test_shard_spec_is_zero_based_and_checked():
    assert parse_shard("0/1") == (0, 1)
    assert parse_shard("3/4") == (3, 4)
    with pytest.raises(MamikitError, match=r"0\.\.3.*SLURM_ARRAY_TASK_ID - 1"):
        parse_shard("4/4")
    for bad in ("-1/3", "1/0", "a/b", "3", "1/2/3"):
        with pytest.raises(MamikitError, match="--shard"):
            parse_shard(bad)
    assert main(["round", "--round", "1", "--data", "d", "--features", "f", "--out", "o", "--list",
                 "--shard", "2/2"]) == 2


# ----------------------------------------------------------------------------- locks


def test_a_locked_run_names_its_holder_and_a_killed_holder_frees_it(tiny_data, tiny_store, tmp_path):
    run = tmp_path / "10-seed0"
    proc = _holder(run)
    try:
        with pytest.raises(RunLocked, match=rf"host {socket.gethostname()} pid {proc.pid} since "):
            train("10", tiny_data, tiny_store, run, train_cfg=TrainConfig(**SMALL), progress=False)
        assert lock_holder(run)["pid"] == proc.pid
        assert not (run / "config.json").exists()  # refused before touching the run
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert (run / HOLDER_FILE).exists()  # the killed holder's note stays behind ...
    assert lock_holder(run) is None  # ... but its lock went with it
    with RunLock(run):
        assert lock_holder(run)["pid"] == os.getpid()
    assert lock_holder(run) is None and not (run / HOLDER_FILE).exists()


def _finished(root, round_no, experiment, seed, **train):
    """A run directory that looks complete, its config.json recording what `round` would train (with `train` changed).

    `round --profile demo` trains with the demo profile's training preset.
    """
    stage = plan(RoundRun(round_no, experiment, seed), root, load_settings(profile="demo").train_overrides())[-1]
    settings = stage.settings(get_profile("demo"))
    settings["train"].update(train)
    (stage.run_dir / "checkpoints" / "last").mkdir(parents=True)
    (stage.run_dir / "checkpoints" / "last" / "state.json").write_text('{"complete": true}')
    (stage.run_dir / "config.json").write_text(json.dumps(settings))
    return stage.run_dir


def test_list_shows_each_runs_state_and_holder(tmp_path, capsys):
    root = tmp_path / "runs"
    _finished(root, 1, "00", 0)
    (run_dir_for(root, 1, "01", 0)).mkdir(parents=True)
    (run_dir_for(root, 1, "01", 0) / "log.jsonl").write_text("")
    _finished(root, 0, "02", 1)  # a finished run of an earlier round is reused
    proc = _holder(run_dir_for(root, 1, "03", 1))
    try:
        args = ["round", "--round", "1", "--data", "d", "--features", "f", "--out", str(root), "--seeds", "0,1",
                "--list"]
        assert main(args) == 0
        lines = capsys.readouterr().out.splitlines()
        assert main([*args, "--shard", "1/3"]) == 0
        shard_lines = capsys.readouterr().out.splitlines()
    finally:
        proc.stdin.close()
        proc.wait()
    assert lines == ["00-seed0\tcomplete", "00-seed1\tnot started", "01-seed0\tinterrupted", "01-seed1\tnot started",
                     "02-seed0\tnot started", "02-seed1\tcomplete in round0", "03-seed0\tnot started",
                     f"03-seed1\tnot started, locked by host {socket.gethostname()} pid {proc.pid} since "
                     + lines[-1].split(" since ")[-1]]
    assert shard_lines == lines[1::3]
    assert not (root / "round1" / "00-seed1").exists()  # listing trains nothing


# A worker between taking the lock and writing its `.lock.json` (RunLock does both, in that order).
BARE_HOLD = ("import sys; from pathlib import Path; from filelock import FileLock\n"
             "with FileLock(Path(sys.argv[1]) / '.lock', thread_local=False):\n    print('held', flush=True)\n"
             "    sys.stdin.read()\n")


def test_rerun_changed_deletes_a_run_only_under_its_lock(tmp_path):
    root = tmp_path / "runs"
    run = _finished(root, 1, "00", 0, lr=5e-4)  # recorded with another learning rate: "changed"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen([sys.executable, "-c", BARE_HOLD, str(run)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, env=env)
    try:
        assert proc.stdout.readline().strip() == "held"
        assert not (run / HOLDER_FILE).exists()  # nothing says who holds it yet
        results = []
        dirs = run_round(1, "no-data", "no-features", root, train_overrides=SMALL, progress=False, results=results,
                         experiments=["00"], rerun_changed=True)
    finally:
        proc.stdin.close()
        proc.wait()
    assert [(r.run.name, r.state) for r in results] == [("00-seed0", "locked")] and dirs == []
    assert "another process" in results[0].error
    assert (run / "config.json").exists() and (run / "checkpoints" / "last" / "state.json").exists()  # left whole


def test_rerun_changed_clears_a_free_run_but_keeps_its_lock_file(tmp_path):
    from mamikit.rounds import _skip, clear_changed

    root = tmp_path / "runs"
    run = _finished(root, 1, "00", 0, lr=5e-4)
    (run / ".lock").write_text("")  # left by the worker that trained it
    demo = load_settings(profile="demo").train_overrides()  # what _finished recorded, bar the changed value
    assert _skip(root, RoundRun(1, "00", 0), train_overrides=demo, rerun_changed=True) is None  # train it again
    # the lock file stays: a worker waiting on it would otherwise lock a file no one else sees
    assert sorted(p.name for p in run.iterdir()) == [".lock"]
    same = _finished(root, 1, "01", 0)  # the same settings: nothing to clear
    assert _skip(root, RoundRun(1, "01", 0), train_overrides=demo, rerun_changed=True).state == "complete"
    # retrained with the wanted settings by another worker since the round looked: compared again under the lock
    assert not clear_changed(same, plan(RoundRun(1, "01", 0), root, demo)[-1].settings(get_profile("demo")))
    assert run_is_complete(same) and (same / "config.json").exists()


# ----------------------------------------------------------------------------- provenance


def test_config_records_provenance_of_each_attempt(tiny_data, tiny_store, tmp_path):
    cfg = TrainConfig(**dict(SMALL, evals_per_epoch=2))
    run = train("20", tiny_data, tiny_store, tmp_path / "20", train_cfg=cfg, progress=False, stop_after_evals=1)
    first = _config(run)["provenance"]
    assert {"python", "torch", "transformers", "open_clip", "timm", "mamikit", "git_commit", "device", "host",
            "pid"} <= set(first)
    assert first["torch"] and torch.__version__.startswith(first["torch"])
    assert first["pid"] == os.getpid() and first["host"] == socket.gethostname() and first["device"].startswith("cpu")
    assert first["finished"] is None and first["attempt"] == 1
    train("20", tiny_data, tiny_store, run, train_cfg=cfg, progress=False, resume=True)
    last = _config(run)["provenance"]
    assert last["attempt"] == 2 and last["first_started"] == first["started"]
    assert (datetime.fromisoformat(first["started"]) <= datetime.fromisoformat(last["started"])
            < datetime.fromisoformat(last["finished"]))


# ----------------------------------------------------------------------------- a round: sequential, then on Ray


@pytest.fixture(scope="module")
def sequential_round(tiny_data, tiny_store, tmp_path_factory):
    """Round 3 run one after another with one torch thread; run 20 held by another worker on the first pass."""
    root = tmp_path_factory.mktemp("sequential")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        proc = _holder(run_dir_for(root, 3, "20", 0))
        first = []
        try:
            run_round(3, tiny_data, tiny_store, root, train_overrides=SMALL, progress=False, results=first)
        finally:
            proc.stdin.close()
            proc.wait()
        second = []
        run_round(3, tiny_data, tiny_store, root, train_overrides=SMALL, progress=False, results=second)
    finally:
        torch.set_num_threads(threads)
    return root, first, second


def test_a_worker_skips_a_run_another_holds_and_a_later_pass_trains_it(sequential_round):
    root, first, second = sequential_round
    assert [(r.run.name, r.state) for r in first] == [("10-seed0", "trained"), ("20-seed0", "locked"),
                                                      ("21-seed0", "trained")]
    assert "pid" in first[1].error
    # "trained", not "resumed": the skipped pass left nothing in the run directory
    assert [(r.run.name, r.state) for r in second] == [("10-seed0", "complete"), ("20-seed0", "trained"),
                                                       ("21-seed0", "complete")]
    assert all(run_is_complete(r.run_dir) for r in second)
    table = summary_table(first).splitlines()
    assert table[0].split() == ["run", "state", "seconds", "error"] and "round3/20-seed0  locked" in table[2]


def test_a_run_another_worker_finished_meanwhile_is_reported_complete(sequential_round, tiny_data, tiny_store,
                                                                          monkeypatch):
    """Between the round's look at a run and train() taking its lock, another worker finishes it: not "trained"."""
    import mamikit.rounds

    root = sequential_round[0]
    monkeypatch.setattr(mamikit.rounds, "_skip", lambda *args, **kwargs: None)  # every look came too early
    before = {p: p.read_bytes() for p in root.rglob("log.jsonl")}
    results = []
    dirs = run_round(3, tiny_data, tiny_store, root, train_overrides=SMALL, progress=False, results=results)
    assert [(r.run.name, r.state) for r in results] == [("10-seed0", "complete"), ("20-seed0", "complete"),
                                                        ("21-seed0", "complete")]
    assert dirs == [run_dir_for(root, 3, name, 0) for name in ("10", "20", "21")]
    assert {p: p.read_bytes() for p in root.rglob("log.jsonl")} == before  # nothing trained again


def test_a_round_on_ray_runs_in_parallel_reports_failures_and_matches_sequential_logs(sequential_round, tiny_data,
                                                                                       tiny_store, tmp_path):
    pytest.importorskip("ray")
    from mamikit.ray_engine import run_round_ray

    seq_root = sequential_round[0]
    broken = run_dir_for(tmp_path, 3, "21", 0)  # an unreadable run: its failure must not stop the others
    (broken / "checkpoints" / "last").mkdir(parents=True)
    (broken / "checkpoints" / "last" / "state.json").write_text("{}")
    (broken / "config.json").write_text("[]")
    results = run_round_ray(3, tiny_data, tiny_store, tmp_path, train_overrides=SMALL, num_cpus=2)
    assert [(r.run.name, r.state) for r in results] == [("10-seed0", "trained"), ("20-seed0", "trained"),
                                                        ("21-seed0", "failed")]
    assert "not a mamikit run configuration" in results[2].error
    provenance = [_config(r.run_dir)["provenance"] for r in results[:2]]
    assert len({p["pid"] for p in provenance} | {os.getpid()}) == 3  # two worker processes, neither this one
    (a0, a1), (b0, b1) = ((datetime.fromisoformat(p["started"]), datetime.fromisoformat(p["finished"]))
                          for p in provenance)
    assert a0 < b1 and b0 < a1  # they trained at the same time
    for r in results[:2]:
        assert "torch threads 1" in _config(r.run_dir)["provenance"]["device"]
        expected = run_dir_for(seq_root, 3, r.run.experiment, 0) / "log.jsonl"
        assert (r.run_dir / "log.jsonl").read_bytes() == expected.read_bytes()
    assert "round3/21-seed0  failed" in summary_table(results)


def test_a_ray_worker_killed_mid_run_is_retried_and_the_run_ends_as_if_never_interrupted(tiny_data, tiny_store,
                                                                                         tmp_path):
    ray = pytest.importorskip("ray")
    from mamikit.ray_engine import _pythonpath, run_round_ray

    overrides = dict(SMALL, evals_per_epoch=2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as a Ray task trains
    try:
        whole = run_round(3, tiny_data, tiny_store, tmp_path / "whole", train_overrides=overrides, progress=False,
                          experiments=["20"])[0]
    finally:
        torch.set_num_threads(threads)
    rows = [json.loads(line) for line in (whole / "log.jsonl").read_text().splitlines()]
    first, last = sorted({r["step"] for r in rows if r.get("kind") is None})
    # The worker dies after the batch before the last evaluation, its first one checkpointed; the retry resumes
    # there and passes `last - first` batches, too few to meet the fault point again.
    fault = f"after_batch:{last}"
    ray.init(num_cpus=1, include_dashboard=False, runtime_env={"env_vars": {"PYTHONPATH": _pythonpath(),
                                                                            "MAMIKIT_FAULT": fault}})
    try:
        results = run_round_ray(3, tiny_data, tiny_store, tmp_path / "ray", train_overrides=overrides,
                                experiments=["20"])
    finally:
        ray.shutdown()
    assert [(r.run.name, r.state) for r in results] == [("20-seed0", "resumed")]
    run = results[0].run_dir
    assert run_is_complete(run) and _config(run)["provenance"]["attempt"] == 2  # a second process finished it
    got = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r.get("value", r.get("terms")) for r in got] == [r.get("value", r.get("terms")) for r in rows]
    assert got == rows


# ----------------------------------------------------------------------------- one experiment per notebook cell


def test_a_round_narrowed_to_experiments_keeps_their_order_and_both_stages_of_30():
    from mamikit.rounds import _resolve_runs

    assert ([r.name for r in _resolve_runs(1, [1, 0], None, ["03", "00"])]
            == ["00-seed0", "00-seed1", "03-seed0", "03-seed1"])
    assert [r.name for r in _resolve_runs(4, [0], None, "30")] == ["30-seed0"]
    stages = plan(RoundRun(4, "30", 0), "runs", {"epochs": 2})
    assert [s.run_dir.name for s in stages] == ["30-stage1-seed0", "30-seed0"]
    assert [r.name for r in _resolve_runs(2, [0, 1], "1/2", ["10", "12"])] == ["10-seed1", "12-seed1"]
    with pytest.raises(MamikitError, match="experiment 20 is not in round 1"):
        _resolve_runs(1, [0], None, ["20"])


def test_run_experiment_trains_only_that_experiment_of_its_round(tiny_data, tiny_store, tmp_path):
    from mamikit.rounds import round_status, run_experiment
    from mamikit.settings import load_settings

    settings = load_settings(data_root=str(tiny_data), features_root=str(tiny_store), run_root=str(tmp_path), epochs=1,
                             evals_per_epoch=1, accumulation=2, device="cpu")
    with pytest.raises(MamikitError, match="rounds \\[2, 3, 4\\]; say which"):
        run_experiment("10", settings)
    with pytest.raises(MamikitError, match="in no round"):
        run_experiment("99", settings)
    dirs = run_experiment("20", settings, progress=False)
    assert dirs == [tmp_path / "runs" / "round3" / "20-seed0"] and run_is_complete(dirs[0])
    assert sorted(p.name for p in (tmp_path / "runs" / "round3").iterdir()) == ["20-seed0"]
    status = round_status(3, settings)
    assert list(status.columns) == ["10", "20", "21"]
    assert status.loc["seed 0"].tolist() == ["not started", "complete", "not started"]
    assert status.loc["Backbones", "20"] == "CLIP"


def test_a_run_recorded_before_query_align_existed_reads_as_trained_with_it_off(tmp_path):
    """The switch is off for every paper experiment; an older config.json without it is not a changed run."""
    from mamikit.rounds import settings_differences
    from mamikit.utils import write_json

    wanted = {"experiment": {"name": "10", "pooling": "none", "query_align": False}, "train": {"lr": 2e-4}}
    write_json(tmp_path / "config.json", {"experiment": {"name": "10", "pooling": "none"}, "train": {"lr": 2e-4}})
    assert settings_differences(tmp_path, wanted) == []
    wanted["experiment"]["query_align"] = True
    assert settings_differences(tmp_path, wanted) == ["experiment.query_align"]
    del wanted["experiment"]["query_align"]
    wanted["experiment"]["schedule_as_coded"] = False  # a switch whose absence does not mean its default
    assert settings_differences(tmp_path, wanted) == ["experiment.schedule_as_coded"]


def test_a_complete_run_whose_finish_was_killed_before_its_bests_settled_gets_them_in_place(sequential_round,
                                                                                              tiny_data, tiny_store,
                                                                                              tmp_path):
    root = tmp_path / "runs"
    shutil.copytree(sequential_round[0], root)
    checkpoints = run_dir_for(root, 3, "20", 0) / "checkpoints"
    bests = sorted(p.name for p in checkpoints.glob("best-*"))
    assert bests
    (checkpoints / STAGED).mkdir()
    for name in bests:  # the finish wrote `last` and staged its bests, then the machine went
        shutil.move(checkpoints / name, checkpoints / STAGED / name)
    results = []
    run_round(3, tiny_data, tiny_store, root, train_overrides=SMALL, progress=False, results=results,
              experiments=["20"])
    assert [(r.run.name, r.state) for r in results] == [("20-seed0", "complete")]
    assert sorted(p.name for p in checkpoints.glob("best-*")) == bests and not (checkpoints / STAGED).exists()


def test_round_5_trains_each_experiment_as_30_is_and_reuses_round_4s_30(tmp_path):
    for name in ROUNDS[5]:
        stages = plan(RoundRun(5, name, 0), tmp_path, dict(SMALL))
        assert [s.run_dir.name for s in stages] == [f"{name}-stage1-seed0", f"{name}-seed0"], name
        assert stages[1].train_cfg.init_from == str(stages[0].run_dir.resolve())
    # round 5's 30 records what round 4's did but for the round folder of its first stage: round 4's is reused
    round4, round5 = (plan(RoundRun(r, "30", 0), tmp_path, dict(SMALL))[-1] for r in (4, 5))
    config = round4.settings(get_profile("demo"))
    round4.run_dir.mkdir(parents=True)
    (round4.run_dir / "config.json").write_text(json.dumps(config))
    assert settings_differences(round4.run_dir, round5.settings(get_profile("demo"))) == []
    other = dict(config, train=dict(config["train"], init_from=str(tmp_path / "round4" / "10-seed0")))
    (round4.run_dir / "config.json").write_text(json.dumps(other))
    assert settings_differences(round4.run_dir, round5.settings(get_profile("demo"))) == ["train.init_from"]
