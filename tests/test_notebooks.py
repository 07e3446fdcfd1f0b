"""The numbered notebooks: clean in git, settings + calls only, and all of them run headless."""

import base64
import json
import re

import nbformat
import pytest

from mamikit.experiments import ROUNDS
from mamikit.notebooks import SMALL_PARAMETERS, SMALL_SETTINGS, notebook_paths, run_notebooks, strip_notebook
from mamikit.runs import run_is_complete

EXPECTED = ["00_setup", "01_data", "02_feature_extraction", "03_round1_encoders_pooling", "04_round2_objectives",
            "05_round3_backbones", "06_round4_multitask", "07_significance", "08_visualizations",
            "09_predict_and_submit", "10_round5_future_work"]


def test_the_suite_is_numbered_in_running_order():
    assert [p.stem for p in notebook_paths()] == EXPECTED


@pytest.mark.parametrize("path", notebook_paths(), ids=lambda p: p.stem)
def test_notebook_layout(path):
    nb = nbformat.read(str(path), as_version=4)
    assert nb.cells[0].cell_type == "markdown" and "writes" in nb.cells[0].source.lower()
    code = [c for c in nb.cells if c.cell_type == "code"]
    if path.stem == "00_setup":  # its parameters (PROJECT, SOURCE) come before the Colab cell that installs from them
        code[0], code[1] = code[1], code[0]
    assert "google.colab" in code[0].source and "drive.mount" in code[0].source
    assert code[1].metadata.get("tags") == ["parameters"]
    for name in ("SETTINGS", "OVERRIDES"):  # every other setting is a name in OVERRIDES (mk.settings_fields())
        assert re.search(rf"^{name} = ", code[1].source, re.M), name
    assert code[2].source.count("mk.load_settings(SETTINGS, **OVERRIDES)") == 1
    for cell in code:
        assert cell.outputs == [] and cell.execution_count is None, "outputs must be stripped before commit"
        assert not re.search(r"^\s*(def|class) ", cell.source, re.M), "notebooks hold calls, not definitions"


def test_strip_removes_outputs(tmp_path):
    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell("1 + 1")
    cell.outputs = [nbformat.v4.new_output("execute_result", {"text/plain": "2"}, execution_count=1)]
    cell.execution_count = 1
    nb.cells.append(cell)
    path = tmp_path / "x.ipynb"
    nbformat.write(nb, str(path))
    assert strip_notebook(path) is True
    again = json.loads(path.read_text())
    assert again["cells"][0]["outputs"] == [] and again["cells"][0]["execution_count"] is None
    assert strip_notebook(path) is False


def test_show_files_draws_pictures_and_tables_and_the_static_copy_names_the_controls(tmp_path):
    import ipywidgets as W
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    from mamikit.notebooks import show_files, tensorboard
    from mamikit.widgets import Panel

    fig = Figure(figsize=(2, 2))
    fig.add_subplot().plot([0, 1])
    fig.savefig(tmp_path / "b_box.png")
    (tmp_path / "a_tukey.csv").write_text("group1,group2,reject\n00,01,True\n")
    (tmp_path / "c_box.txt").write_text("not shown")
    panel = show_files(tmp_path, "*.csv", "*.png")
    assert panel.shown["paths"] == [tmp_path / "a_tukey.csv", tmp_path / "b_box.png"]
    shown = panel.display_outputs()  # no controls: the files alone, each its own output
    assert ["a_tukey.csv" in o["data"]["text/html"] for o in shown[:2]] == [True, False]
    assert "<table" in shown[1]["data"]["text/html"] and "b_box.png" in shown[2]["data"]["text/html"]
    assert (list(shown[3]["data"]) == ["image/png", "text/plain"]
            and shown[3]["data"]["image/png"] == base64.b64encode((tmp_path / "b_box.png").read_bytes()).decode())
    picker = Panel({"split": W.Dropdown(options=["train", "dev"], value="dev", description="split"),
                    "next": W.Button(description="next")}, [], lambda: None)
    static = picker.display_outputs()[0]["data"]["text/html"]
    assert ">split: dev<" in static and ">next<" in static
    assert tensorboard(tmp_path) is False  # no notebook here: no server started


def test_all_notebooks_run_headless_on_the_small_demo(small_demo):
    root, executed = small_demo
    assert [p.stem for p in executed] == EXPECTED
    report = root / "report"
    for table in ("table2_round1", "table3_round2", "table4_round3", "table5_round4", "table6_round5"):
        text = (report / f"{table}.md").read_text()
        assert "Test - Task_A" in text and "Train-Task_B" in text
    # table 6 compares round 5's experiments with 30, printing the rows they turn on; tables 2-5 keep the paper's
    table6 = (report / "table6_round5.md").read_text()
    assert [c.strip() for c in table6.splitlines()[0].split("|")[2:-1]] == ROUNDS[5] and "Query Algn" in table6
    assert "Query Algn" not in (report / "table5_round4.md").read_text()
    # round 5 reuses round 4's experiment 30 and trains each of its own as 30 is trained: two stages
    assert not (root / "runs" / "round5" / "30-seed0").exists()
    for name in ROUNDS[5][1:]:
        assert (root / "runs" / "round5" / f"{name}-stage1-seed0" / "log.jsonl").exists(), name
        assert run_is_complete(root / "runs" / "round5" / f"{name}-seed0"), name
    names = {p.name for p in report.glob("*.png")}
    for part in ("tsne", "self_attention", "cross_attention", "tukey", "box"):
        assert any(part in n for n in names), part
    assert list(report.glob("*tukey*.csv"))
    # experiment 02 runs in rounds 1 and 2, but is trained once and reused
    assert len(list((root / "runs").glob("round*/02-seed0/log.jsonl"))) == 1
    # scaled-down epochs keep the paper's ratio: experiment 30 trains twice as long as 10, as a first stage
    # continued by a second one from its last weights (section 5.1.4)
    configs = {name: json.loads(next((root / "runs").glob(f"round*/{name}-seed0/config.json")).read_text())["train"]
               for name in ("10", "30-stage1", "30")}
    assert {name: c["epochs"] for name, c in configs.items()} == {name: SMALL_SETTINGS["epochs"] for name in configs}
    assert configs["30"]["init_from"].endswith("30-stage1-seed0") and configs["10"]["init_from"] is None
    # what a reader sees: pictures (not "<Figure ...>" text), widgets with their controls' static copy and their
    # view as pictures beside them, styled tables
    outputs = {p.stem[:2]: [o for c in nbformat.read(str(p), as_version=4).cells if c.cell_type == "code"
                            for o in c.outputs]
               for p in executed}
    for nb in ("01", "03", "04", "05", "06", "08", "09"):
        data = [o.get("data", {}) for o in outputs[nb]]
        panels = [i for i, d in enumerate(data) if "application/vnd.jupyter.widget-view+json" in d
                  and "<span" in d.get("text/html", "")]
        assert panels and any("image/png" in d for d in data[panels[-1]:]), nb
    for nb in ("01", "03", "06"):
        assert any("image/png" in o.get("data", {}) for o in outputs[nb]), nb
    assert not any("<Figure size" in o.get("data", {}).get("text/plain", "") and "image/png" not in o.get("data", {})
                   for nb in outputs.values() for o in nb)
    assert not any(str(o.get("data", {}).get("text/plain", "")).startswith("| ")
                   for nb in outputs.values() for o in nb)
    # the submission: a Task A and a Task B zip, chosen by dev score
    picks = json.loads((report / "submission" / "submission.json").read_text())
    assert sorted(picks) == ["A", "B"] and all(pick["dev_score"] > 0 for pick in picks.values())
    # re-running a round notebook trains nothing again
    rerun = run_notebooks(root, SMALL_SETTINGS, SMALL_PARAMETERS, names=["04"])[0]
    text = rerun.read_text()
    assert "reused" in text and "train 10" not in text


# the figures each notebook writes under report/, all of which its rendering must show; 09 writes none there, and
# shows the meme and its prediction
REPORT_FIGURES = {"07": ["tukey_round[1-4]*.png", "box_round[1-4]*.png"], "08": ["figure3_tsne.png", "figure4*.png"], "09": [],
                  "10": ["tukey_round5*.png", "box_round5*.png"]}
PANEL_FIGURES = {"07": 3, "08": 3, "09": 2, "10": 3}  # the first view of the panel at each notebook's end


def test_every_figure_shows_where_a_notebook_is_read_without_a_kernel(small_demo):
    """nbconvert's HTML (what GitHub and nbviewer show): the figures are pictures, not only widget state."""
    from nbconvert import HTMLExporter

    root, executed = small_demo
    report = root / "report"
    for path in executed:
        nb = path.stem[:2]
        if nb not in REPORT_FIGURES:
            continue
        body, _ = HTMLExporter().from_filename(str(path))
        pictures = re.findall(r"<img[^>]*\bsrc=[\"']data:image/png;base64,[A-Za-z0-9+/]{100}", body)
        written = sum(len(list(report.glob(pattern))) for pattern in REPORT_FIGURES[nb])
        assert written >= (2 if nb == "08" else 0) and len(pictures) >= written + PANEL_FIGURES[nb], nb


def test_round_notebooks_train_in_a_compact_view_and_end_each_cell_with_a_table(small_demo):
    root, executed = small_demo
    cells = [c for c in nbformat.read(str(executed[EXPECTED.index("03_round1_encoders_pooling")]), as_version=4).cells
             if c.cell_type == "code"]
    sources = [c.source for c in cells]
    board = next(i for i, s in enumerate(sources) if s.startswith("mk.tensorboard("))
    training = [i for i, s in enumerate(sources) if s.startswith("mk.run_experiment(")]
    assert len(training) == 4 and board < training[0]
    for i in training:
        text = "".join(o.get("text", "") for o in cells[i].outputs if o.output_type == "stream")
        assert " step " not in text, text[:300]  # no log line per evaluation
        value = next(o for o in cells[i].outputs if o.output_type == "execute_result")["data"]
        assert "best dev Task_A" in value["text/html"] and "trained" in value["text/plain"]
