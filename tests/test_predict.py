"""Tests for mamikit.predict (and figures 3-4 of mamikit.analysis) on a tiny trained demo run."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from mamikit import analysis, predict
from mamikit.cli import main
from mamikit.data import load_datasets


@pytest.fixture(scope="module")
def trained(tiny_data, tiny_store, tiny_run):
    """The session's tiny trained run of experiment 10 (conftest), with its data and store."""
    return tiny_data, tiny_store, tiny_run


def test_predict_meme_agrees_with_the_run_predictions(trained):
    data, _, run = trained
    test = load_datasets(data, ["MAMI"])["MAMI"].splits["test"].iloc[0]
    result = predict.predict_meme(run, test["image"], test["text"], device="cpu")
    assert set(result["probabilities"]) == {"MAMI", "Task_A", "Task_B"}
    p = result["probabilities"]["Task_A"]["misogynous"]
    assert 0.0 <= p <= 1.0 and result["predictions"]["Task_A"]["misogynous"] == int(p >= 0.5)
    # The single-meme path (backbones run now) must match the batched path (feature store) of training.
    saved = pd.read_csv(run / "predictions" / "best-Task_A" / "test__Task_A.csv", dtype={"id": str}).set_index("id")
    assert p == pytest.approx(float(saved.at[str(test["id"]), "misogynous_prob"]), abs=2e-3)


def test_predict_cli_prints_json(trained, capsys):
    data, _, run = trained
    test = load_datasets(data, ["MAMI"])["MAMI"].splits["test"].iloc[1]
    assert main(["predict", "--run", str(run), "--image", test["image"], "--text", test["text"], "--device", "cpu",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out["predictions"]["Task_B"]) == {"shaming", "stereotype", "objectification", "violence"}
    # each query's cross-attention is a distribution over the real memory tokens
    shares = out["attention_by_encoder"]
    assert set(shares) == {"clip", "detr", "text"} and sum(shares.values()) == pytest.approx(1.0, abs=1e-3)
    assert main(["predict", "--run", str(run), "--image", test["image"], "--text", test["text"],
                 "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    assert "Task_A: misogynous" in text and "decoder cross-attention: clip" in text


def test_figures_for_run_and_report_with_figures(trained, tmp_path):
    _, _, run = trained
    paths = analysis.figures_for_run(run, tmp_path / "fig", device="cpu")
    assert [p.name for p in paths] == ["figure3_tsne.png", "figure4a_self_attention.png",
                                       "figure4b_cross_attention.png"]
    assert all(p.stat().st_size > 10_000 for p in paths)
    assert main(["report", str(run.parent.parent), "--out", str(tmp_path / "report")]) == 0
    names = {p.name for p in (tmp_path / "report").iterdir()}
    assert {"table5_round4.md", "figure3_tsne.png", "figure4b_cross_attention.png"} <= names
    assert np.isfinite(float(pd.read_csv(tmp_path / "report" / "table5_round4.csv")
                             .set_index("row").at["Test - Task_A", "10"]))
