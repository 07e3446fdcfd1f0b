"""The paper's path end to end, on its real architectures with random weights (nothing downloaded).

synth -> extract (RN50x4 at 288 px, DETR-ResNet-50, BERT-base uncased) ->
train experiment 30 briefly -> report -> predict one meme, through the CLI.
About 4 CPU-minutes: the backbones are full size, so the meme set is tiny.
"""

from __future__ import annotations

import json
import shutil
import time

import pytest

import mamikit as mk
from mamikit.cli import main

PAPER = ["--profile", "paper", "--weights", "random", "--device", "cpu"]


@pytest.fixture(scope="module")
def paper_run(tmp_path_factory):
    """A data folder, its paper-architecture store and a one-epoch run of experiment 30, with step times."""
    root = tmp_path_factory.mktemp("paper-path")
    data, store, runs = root / "data", root / "store", root / "runs"
    seconds = {}

    def step(name, args):
        start = time.perf_counter()
        assert main(args) == 0, name
        seconds[name] = round(time.perf_counter() - start, 1)

    step("synth", ["synth", "--out", str(data), "--seed", "3", "--mami", "6", "--mami-test", "2", "--fbhm", "6"])
    step("extract", ["extract", "--data", str(data), "--out", str(store), "--batch-size", "1", *PAPER])
    step("train", ["train", "--experiment", "30", "--data", str(data), "--features", str(store), "--out",
                   str(runs / "round4" / "30-seed0"), "--epochs", "1", "--evals-per-epoch", "1", "--batch-size", "8",
                   "--accumulation", "1", *PAPER])
    yield {"data": data, "store": store, "run": runs / "round4" / "30-seed0", "runs": runs, "root": root,
           "seconds": seconds}
    print(f"paper path step times (s): {seconds}")
    shutil.rmtree(runs, ignore_errors=True)  # the checkpoints of the full-size model take about 2 GB


def test_store_holds_the_paper_shapes(paper_run):
    store = mk.FeatureStore(paper_run["store"])
    assert store.dims == {"clip": 640, "detr": 256, "text": 768}
    for dataset, split in (("MAMI", "train"), ("MAMI", "test"), ("FBHM", "train")):
        feats = store.load(dataset, split)
        n = len(feats)
        assert n > 0
        assert tuple(feats.clip.shape) == (n, 5, 640)  # whole image + 2x2 slices, RN50x4 embeddings
        assert tuple(feats.detr.shape) == (n, 100, 256) and tuple(feats.detr_logits.shape) == (n, 100, 92)
        assert tuple(feats.detr_mask.shape) == (n, 100) and bool(feats.detr_mask.any(1).all())
        assert feats.text_hidden.shape[1] == 768 and feats.text_offsets.shape == (n + 1,)
        assert int(feats.text_offsets[-1]) == feats.text_hidden.shape[0] == feats.text_ids.shape[0]
        assert set(feats.text_ids[feats.text_offsets[:-1]].tolist()) == {101}  # every meme starts with [CLS]
    specs = json.loads((paper_run["store"] / "manifest.json").read_text())["backbones"]
    assert {name: spec["model"] for name, spec in specs.items()} == {
        "clip": "RN50x4", "detr": "facebook/detr-resnet-50", "text": "Hate-speech-CNERG/bert-base-uncased-hatexplain"}
    assert {spec["weights"] for spec in specs.values()} == {"random (seed 0)"}
    assert "288" in specs["clip"]["preprocessing"] and "800" in specs["detr"]["preprocessing"]


def test_training_wrote_its_log_and_predictions(paper_run):
    run = paper_run["run"]
    rows = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r.get("kind") != "loss"]  # the evaluation rows
    trained = mk.get_experiment("30").datasets  # table 1's MAMI and FBHM (not the text-only HSText)
    assert {r["task"] for r in rows} == {task.name for name in trained for task in mk.load_tasks()[name]}
    assert {r["split"] for r in rows} == {"train", "dev", "test"}
    for task in ("Task_A", "Task_B", "Hateful"):
        assert (run / "predictions" / "last" / f"test__{task}.csv").is_file()
    assert json.loads((run / "config.json").read_text())["profile"]["weights"] == "random"


def test_report_and_one_meme_prediction(paper_run, capsys):
    report = paper_run["root"] / "report"
    start = time.perf_counter()
    assert main(["report", str(paper_run["runs"]), "--out", str(report)]) == 0
    paper_run["seconds"]["report"] = round(time.perf_counter() - start, 1)
    assert (report / "table5_round4.md").is_file()

    image = sorted((paper_run["data"] / "MAMI" / "test").glob("*.jpg"))[0]
    capsys.readouterr()
    start = time.perf_counter()
    args = ["predict", "--run", str(paper_run["run"]), "--image", str(image), "--text", "A MEME", "--device", "cpu",
            "--json"]
    assert main(args) == 0
    paper_run["seconds"]["predict"] = round(time.perf_counter() - start, 1)
    result = json.loads(capsys.readouterr().out)
    expected = {task.name: list(task.labels)  # table 1
                for name in mk.get_experiment("30").datasets for task in mk.load_tasks()[name]}
    assert {task: list(probs) for task, probs in result["probabilities"].items()} == expected
    assert all(0.0 <= p <= 1.0 for probs in result["probabilities"].values() for p in probs.values())
    assert set(result["attention_by_encoder"]) == {"clip", "detr", "text"}


def test_train_refuses_the_paper_store_with_another_profile_or_weights(paper_run, capsys):
    base = ["train", "--experiment", "30", "--data", str(paper_run["data"]), "--features", str(paper_run["store"]),
            "--out", str(paper_run["root"] / "refused"), "--device", "cpu"]
    capsys.readouterr()
    assert main([*base, "--profile", "demo"]) == 2
    assert "built with the paper profile; this run asks for the demo profile" in capsys.readouterr().err
    assert main([*base, "--profile", "paper"]) == 2  # pretrained weights asked, random ones extracted
    assert "extracted with weights 'random (seed 0)'; this run asks for 'openai'" in capsys.readouterr().err
