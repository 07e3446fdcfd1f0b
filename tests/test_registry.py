"""Tests for mamikit.registry: table 1's vocabulary comes from mamikit/tasks.json, and a new dataset needs no code."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from mamikit.registry import (TASKS_PATH, load_tasks, official_task_names, official_tasks, primary_dataset,
                              training_datasets)
from mamikit.utils import MamikitError


def _write_tasks(path, **changes):
    cfg = json.loads(TASKS_PATH.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))
    return path


def test_the_repository_table_declares_mami_and_its_official_tasks():
    assert primary_dataset() == "MAMI"
    assert official_task_names() == ("Task_A", "Task_B")
    official = official_tasks()
    assert official["A"].labels == ("misogynous",) and len(official["B"].labels) == 4
    assert training_datasets(False) == ("MAMI",) and training_datasets(True) == ("MAMI", "FBHM")


def test_official_tasks_are_checked(tmp_path):
    bad = _write_tasks(tmp_path / "a.json", official={"A": "Task_B"})
    with pytest.raises(MamikitError, match="exactly one label"):
        official_tasks(bad)
    missing = _write_tasks(tmp_path / "b.json", official={"A": "Task_A", "B": "Nope"})
    with pytest.raises(MamikitError, match="'Nope'.*MAMI does not define"):
        official_tasks(missing)
    primary = _write_tasks(tmp_path / "c.json", primary="ELSEWHERE")
    with pytest.raises(MamikitError, match="primary dataset 'ELSEWHERE'"):
        primary_dataset(primary)


def test_renamed_official_task_drives_answers_and_tables(tmp_path, monkeypatch):
    cfg = json.loads(TASKS_PATH.read_text())
    cfg["datasets"]["MAMI"]["tasks"] = {"Misogyny": ["misogynous"],
                                        "Kinds": cfg["datasets"]["MAMI"]["tasks"]["Task_B"]}
    cfg["official"] = {"A": "Misogyny", "B": "Kinds"}
    path = tmp_path / "tasks.json"
    path.write_text(json.dumps(cfg))
    monkeypatch.setenv("MAMIKIT_TASKS", str(path))
    assert official_task_names() == ("Misogyny", "Kinds")
    assert [t.name for t in load_tasks()["MAMI"]] == ["Misogyny", "Kinds"]


def _third_dataset(data_root, name: str, seed: int = 0) -> None:
    """A JSONL dataset in the Hateful Memes layout with two labels, from the FBHM memes' images and texts."""
    rng = np.random.default_rng(seed)
    src = data_root / "FBHM"
    dst = data_root / name
    shutil.copytree(src / "img", dst / "img")
    for stem in ("train", "dev_seen"):
        rows = [json.loads(line) for line in (src / f"{stem}.jsonl").read_text().splitlines() if line.strip()]
        with open(dst / f"{stem}.jsonl", "w") as fh:
            for row in rows:
                funny = int(rng.random() < 0.4)
                fh.write(json.dumps({"id": f"t{row['id']}", "img": row["img"], "text": row["text"],
                                     "funny": funny, "dark": int(funny and rng.random() < 0.5)}) + "\n")


def test_a_third_dataset_added_to_tasks_json_trains_without_code_changes(tiny_data, tiny_store, tmp_path, monkeypatch):
    from mamikit.experiments import get_experiment
    from mamikit.extraction import extract
    from mamikit.train import TrainConfig, train

    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    _third_dataset(data, "TOY")
    store = tmp_path / "store"
    shutil.copytree(tiny_store, store)
    cfg = json.loads(TASKS_PATH.read_text())
    cfg["datasets"]["TOY"] = {"labels": ["funny", "dark"], "tasks": {"Funny": ["funny"], "Tone": ["funny", "dark"]}}
    path = tmp_path / "tasks.json"
    path.write_text(json.dumps(cfg))
    monkeypatch.setenv("MAMIKIT_TASKS", str(path))

    summary = extract(data, store, "demo", batch_size=32, device="cpu", progress=False)
    # MAMI and FBHM were complete
    assert summary["written"] and all(key.startswith("TOY/") for key in summary["written"])
    experiment = get_experiment("30")
    assert experiment.datasets == ("MAMI", "FBHM", "TOY")
    out = tmp_path / "run"
    train(experiment, data, store, out, profile="demo",
          train_cfg=TrainConfig(epochs=1, evals_per_epoch=1, accumulation=1, lr=1e-3, device="cpu"), progress=False)
    config = json.loads((out / "config.json").read_text())
    assert {t["name"] for t in config["tasks"]} == {"MAMI", "Task_A", "Task_B", "Hateful", "Funny", "Tone"}
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r.get("kind") != "loss"]  # the evaluation rows
    scored = {(r["split"], r["task"]) for r in rows if r["metric"] == "score" and r["label"] is None}
    assert {("train", "Tone"), ("dev", "Tone"), ("dev", "Funny")} <= scored
    assert any(r["task"] == "Tone" and r["label"] == "dark" for r in rows)
    # The official answers still come from the primary dataset's official tasks.
    assert (out / "answer" / "last" / "taskA" / "answer.txt").exists()
