"""Tests for mamikit.widgets: each view driven through the ipywidgets API.

Controls are changed by setting their `value`, buttons by `click()`, the upload by
setting its `value`; what a view shows is read back from its Output's display data
and from `panel.shown`.
"""

from __future__ import annotations

import base64
import datetime
import inspect
import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import ipywidgets as W

from mamikit import analysis, widgets
from mamikit.data import load_datasets
from mamikit.predict import predict_meme
from mamikit.store import FeatureStore


# The lowest-versions job runs the tests marked smoke with ipywidgets 7.8: the quick ones (the tiny set and store
# are built for other smoke tests too); the two views of a trained run take a training and a model each.
IPYWIDGETS_7 = W.__version__.startswith("7.")


def _kinds(panel) -> list[str]:
    """The richest type of each Output entry: "image/png" or "text/html"."""
    return ["image/png" if "image/png" in o["data"] else "text/html" for o in panel.output.outputs]


def _html(panel) -> str:
    return "".join(o["data"].get("text/html", "") for o in panel.output.outputs)


def _pngs(panel) -> list[bytes]:
    return [base64.b64decode(o["data"]["image/png"]) for o in panel.output.outputs if "image/png" in o["data"]]


# ----------------------------------------------------------------------------- the panel itself


@pytest.mark.smoke
def test_a_displayed_panel_writes_the_widget_then_each_figure_as_its_own_output(monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    published = []
    monkeypatch.setattr("IPython.display.publish_display_data", lambda data, metadata=None: published.append(data))

    def draw():
        fig = Figure(figsize=(1, 1))
        fig.add_subplot().plot([0, int(picker.value)])
        panel.show(widgets._heading(f"line to {picker.value}"), fig, pd.DataFrame({"x": [picker.value]}),
                   value=picker.value)

    picker = W.Dropdown(options=["1", "2"], value="1", description="end")
    panel = widgets.Panel({"end": picker, "again": W.Button(description="again")}, [picker], draw)
    panel.redraw_on("end")
    panel.refresh()
    first = list(panel.output.outputs)
    panel._ipython_display_()
    assert [sorted(d) for d in published] == [["application/vnd.jupyter.widget-view+json", "text/html",
                                               "text/plain"], ["text/html", "text/plain"],
                                              ["image/png", "text/plain"], ["text/html", "text/plain"]]
    assert published[0]["application/vnd.jupyter.widget-view+json"]["model_id"] == panel.model_id
    assert ">end: 1<" in published[0]["text/html"] and ">again<" in published[0]["text/html"]
    assert published[1:] == [o["data"] for o in first] and "line to 1" in published[1]["text/html"]
    assert panel.output.outputs == ()  # the live Output does not show the first view twice
    picker.value = "2"  # a live change: the Output shows the new view
    assert panel.shown["value"] == "2" and "line to 2" in _html(panel) and len(_pngs(panel)) == 1

    published.clear()
    bare = widgets.Panel({}, [], lambda: None)  # no controls (show_files): the view alone
    bare.show("<p>only this</p>")
    bare._ipython_display_()
    assert published == [{"text/html": "<p>only this</p>", "text/plain": "<p>only this</p>"}]


@pytest.mark.smoke
def test_uploaded_files_reads_both_ipywidgets_forms():
    seven = {"a.png": {"metadata": {"name": "a.png", "size": 2}, "content": b"ab"}}
    eight = ({"name": "a.png", "type": "image/png", "size": 2, "content": memoryview(b"ab")},)
    assert widgets.uploaded_files(seven) == widgets.uploaded_files(eight) == [("a.png", b"ab")]
    assert widgets.uploaded_files({}) == widgets.uploaded_files(()) == []


# ----------------------------------------------------------------------------- 01: meme browser


@pytest.mark.smoke
def test_meme_browser_filters_by_split_and_label_and_steps_through_the_memes(tiny_data):
    mami = load_datasets(tiny_data, ["MAMI"])["MAMI"]
    every = pd.concat([df.assign(split=s) for s, df in mami.splits.items()], ignore_index=True)
    panel = widgets.meme_browser(tiny_data)
    assert panel.shown["ids"] == every["id"].tolist() and panel.shown["index"] == 0
    assert _kinds(panel) == ["text/html", "image/png", "text/html"]
    first = every.iloc[0]
    assert panel.shown["id"] == first["id"] and first["text"].split()[0] in _html(panel)
    widget, *view = panel.display_outputs()  # the live widget, then the view as outputs every viewer shows
    assert widget["data"][widgets.WIDGET_VIEW]["model_id"] == panel.model_id
    assert "dataset: MAMI" in widget["data"]["text/html"] and "<img" not in widget["data"]["text/html"]
    assert view == list(panel.output.outputs) and sum("image/png" in o["data"] for o in view) == 1

    panel.controls["label"].value = "shaming"
    shaming = every.loc[every["shaming"] == 1, "id"].tolist()
    assert 0 < len(shaming) < len(every) and panel.shown["ids"] == shaming
    assert "shaming" in panel.shown["labels"] and f"1 of {len(shaming)}" in _html(panel)
    panel.controls["next"].click()
    assert panel.shown["index"] == 1 and panel.shown["id"] == shaming[1]
    panel.controls["previous"].click()
    panel.controls["previous"].click()  # wraps around to the last meme
    assert panel.shown["id"] == shaming[-1]

    panel.controls["split"].value = "test"
    assert panel.shown["index"] == 0 and set(panel.shown["ids"]) <= set(mami.splits["test"]["id"])
    assert all(every.set_index("id").loc[m, "shaming"] == 1 for m in panel.shown["ids"])
    panel.controls["label"].value = "none"
    clean = (every[list(mami.labels)] == 0).all(axis=1) & (every["split"] == "test")
    assert panel.shown["ids"] == every.loc[clean, "id"].tolist() and panel.shown["labels"] == []

    panel.controls["dataset"].value = "FBHM"  # the label filter follows the dataset
    assert (list(panel.controls["label"].options) == ["all", "none", "hateful"]
            and panel.controls["label"].value == "all")
    assert set(panel.shown["ids"]) == set(load_datasets(tiny_data, ["FBHM"])["FBHM"].splits["test"]["id"])


# ----------------------------------------------------------------------------- 02: store summary


@pytest.mark.smoke
def test_store_summary_counts_kept_queries_and_text_tokens_and_shows_crops(tiny_store, tiny_data):
    store = FeatureStore(tiny_store)
    train = store.load("MAMI", "train")
    panel = widgets.store_summary(tiny_store, tiny_data, n_memes=2)
    summary = panel.shown["summary"]
    assert list(summary.index) == [f"{d}/{s}" for d, s in store.splits()]
    assert summary.at["MAMI/train", "memes"] == len(train)
    assert summary.at["MAMI/train", "DETR queries kept mean"] == round(float(train.detr_mask.sum(1).float().mean()), 1)
    assert summary.at["MAMI/train", "text tokens max"] == int((train.text_offsets[1:] - train.text_offsets[:-1]).max())
    assert _kinds(panel) == ["text/html", "image/png", "image/png"]  # table, histograms, crops
    first, pngs = panel.shown["memes"], _pngs(panel)
    assert len(first) == 2 and set(first) <= set(train.ids)
    assert Image.open(io.BytesIO(pngs[1])).size[0] > 500

    panel.controls["other"].click()
    assert panel.shown["memes"] != first and _pngs(panel)[1] != pngs[1]
    panel.controls["split"].value = "MAMI/test"
    assert panel.shown["split"] == "MAMI/test" and set(panel.shown["memes"]) <= set(store.load("MAMI", "test").ids)

    bare = widgets.store_summary(tiny_store)  # no data folder: no crops
    assert bare.shown["memes"] == [] and _kinds(bare) == ["text/html", "image/png"]


# ------------------------------------------------------------------------- 03-07: results explorer and learning curves


def _write_run(root: Path, experiment: str, seed: int, n_evals: int = 4, losses: bool = True) -> dict:
    """round1/<experiment>-seed<k> with config.json and a log of score rows (and loss rows); returns the scores."""
    run = root / "round1" / f"{experiment}-seed{seed}"
    run.mkdir(parents=True)
    switches = dict(xformer_enc="shared" if experiment == "00" else "multi",
                    pooling="cls" if experiment == "00" else "none",
                    proj_align=False, contrastive=False, multi_task=False, image_encoders=["clip", "detr"])
    (run / "config.json").write_text(json.dumps({"experiment": dict(name=experiment, **switches),
                                                 "train": {"seed": seed}}))
    rng = np.random.default_rng(10 * int(experiment) + seed)
    scores, rows = {}, []
    for step in range(1, n_evals + 1):
        common = {"experiment": experiment, "seed": seed, "epoch": 0, "step": 10 * step}
        for split in ("train", "dev", "test"):
            for task in ("Task_A", "Task_B"):
                value = round(0.5 + 0.03 * int(experiment) + 0.02 * step + rng.normal(0, 0.01), 6)
                scores[(split, task, 10 * step)] = value
                rows.append({**common, "split": split, "task": task, "label": None, "metric": "score", "value": value})
        if losses:
            rows.append({**common, "kind": "loss", "lr": 1e-3, "batches": 10,
                         "terms": {"loss": 1.0 / step, "Task_A/bce": 0.5 / step}})
    (run / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return scores


@pytest.mark.smoke
def test_results_explorer_redraws_table_box_tukey_and_curves(tmp_path):
    scores = {(e, s): _write_run(tmp_path, e, s) for e in ("00", "01") for s in (0, 1)}
    panel = widgets.results_explorer(tmp_path)
    assert panel.controls["round"].value == 1 and panel.shown["experiments"] == ["00", "01"]
    best_test_a = np.mean([max(v for (sp, t, _), v in scores[("01", s)].items() if (sp, t) == ("test", "Task_A"))
                           for s in (0, 1)])
    assert panel.shown["table"].mean.at["Test - Task_A", "01"] == pytest.approx(best_test_a)
    # heading, table, box, Tukey, curves
    assert _kinds(panel) == ["text/html", "text/html", "image/png", "image/png", "image/png"]
    assert "font-weight: bold" in _html(panel)  # the best experiment of each score row

    panel.controls["task"].value = "Task_B"
    panel.controls["split"].value = "dev"
    expected = sorted(v for (e, s), run in scores.items() for (sp, t, _), v in run.items()
                      if (sp, t) == ("dev", "Task_B"))
    assert sorted(panel.shown["scores"]["score"]) == pytest.approx(expected)

    before = _pngs(panel)[-1]
    panel.controls["run"].value = "round1/01-seed1"  # the curves narrow to one run
    curves = panel.shown["curves"]
    assert (set(curves["run"]) == {"round1/01-seed1"}
            and {"loss/total", "loss/Task_A/bce", "lr", "score/test/Task_A"} <= set(curves["curve"]))
    assert _pngs(panel)[-1] != before

    _write_run(tmp_path, "02", 0)  # a run that finished after the panel opened
    panel.controls["reload"].click()
    assert (panel.shown["experiments"] == ["00", "01", "02"]
            and "round1/02-seed0" in [v for _, v in panel.controls["run"].options])
    panel.controls["round"].value = 2  # round 2 holds 02 only here: one group, so no Tukey test
    assert panel.shown["experiments"] == ["02"] and "Tukey HSD not drawn" in _html(panel)


# ----------------------------------------------------------------------------- 08: figures 3-4


def test_figure_explorer_draws_each_run_and_checkpoint_once(tiny_run, tmp_path, monkeypatch):
    calls = []
    real = inspect.signature(analysis.figures_for_run)

    def fake(*args, **kwargs):  # the real figures are tested in test_predict; here: what the panel asks and shows
        bound = real.bind(*args, **kwargs)
        calls.append(bound.arguments)
        out = Path(bound.arguments["out_dir"])
        out.mkdir(parents=True, exist_ok=True)
        paths = []
        for name in ("figure3_tsne", "figure4a_self_attention", "figure4b_cross_attention"):
            paths.append(out / f"{name}.png")
            Image.new("RGB", (8, 8), (len(calls) * 40, 0, 0)).save(paths[-1])
        return paths

    monkeypatch.setattr(analysis, "figures_for_run", fake)
    panel = widgets.figure_explorer(tiny_run.parent.parent, out_dir=tmp_path, device="cpu")
    assert panel.shown["run"] == str(tiny_run.resolve()) and panel.shown["checkpoint"] == "best"
    assert calls[0]["checkpoint"] == "best" and calls[0]["device"] == "cpu"
    assert _pngs(panel) == [p.read_bytes() for p in panel.shown["paths"]] and len(_pngs(panel)) == 3
    first = _pngs(panel)

    panel.controls["checkpoint"].value = "last"
    assert (calls[-1]["checkpoint"] == "last"
            and panel.shown["paths"][0].parent == tmp_path / "round4_10-seed0" / "last")
    assert _pngs(panel) != first
    panel.controls["checkpoint"].value = "best"  # drawn already: shown again, not recomputed
    assert len(calls) == 2 and _pngs(panel) == first


# ----------------------------------------------------------------------------- 09: prediction panel


def _upload(panel, data: bytes, name: str) -> None:
    """Upload a file as the browser does: ipywidgets 8 sets `value`, 7 sets `metadata` and `data` and counts up."""
    upload = panel.controls["upload"]
    if IPYWIDGETS_7:
        upload.metadata, upload.data = [{"name": name, "type": "image/png", "size": len(data)}], [data]
        upload._counter += 1
    else:
        upload.value = ({"name": name, "type": "image/png", "size": len(data), "content": memoryview(data),
                         "last_modified": datetime.datetime(2024, 1, 1)},)


def test_prediction_panel_shows_predict_memes_probabilities(tiny_run, tiny_data):
    test = load_datasets(tiny_data, ["MAMI"])["MAMI"].splits["test"]
    panel = widgets.prediction_panel(tiny_run.parent.parent, tiny_data, device="cpu")
    assert panel.controls["run"].value == str(tiny_run.resolve())
    reference = predict_meme(tiny_run, test["image"].iloc[0], test["text"].iloc[0], device="cpu")
    assert panel.shown["source"] == "test" and panel.shown["id"] == test["id"].iloc[0]
    assert panel.shown["probabilities"]["Task_A"] == pytest.approx(reference["probabilities"]["Task_A"], abs=1e-6)
    assert panel.shown["attention_by_encoder"] == reference["attention_by_encoder"]
    # the meme, its caption, probabilities and attention
    assert _kinds(panel) == ["image/png", "text/html", "image/png"]

    panel.controls["text"].value = "an edited caption about the kitchen"
    panel.controls["predict"].click()
    edited = predict_meme(tiny_run, test["image"].iloc[0], "an edited caption about the kitchen", device="cpu")
    assert panel.shown["text"] == "an edited caption about the kitchen" and "edited caption" in _html(panel)
    assert panel.shown["probabilities"]["Task_B"] == pytest.approx(edited["probabilities"]["Task_B"], abs=1e-6)

    _upload(panel, Path(test["image"].iloc[0]).read_bytes(), "mine.png")  # the same image, uploaded: same answer
    assert panel.shown["source"] == "upload" and panel.controls["meme"].value is None
    assert panel.shown["probabilities"]["Task_B"] == pytest.approx(edited["probabilities"]["Task_B"], abs=1e-6)

    _upload(panel, b"not an image", "broken.png")
    assert "not an image" in panel.shown["error"] and "not an image" in _html(panel)

    panel.controls["meme"].value = test["id"].iloc[2]  # back to a test meme: its own caption
    assert panel.shown["source"] == "test" and panel.shown["text"] == test["text"].iloc[2]
