"""The numbered notebooks: clean in git, settings + calls only, and all of them run headless."""

import json
import re

import nbformat
import pytest

from mamikit.notebooks import SMALL_PARAMETERS, notebook_paths, run_notebooks, strip_notebook

EXPECTED = ["01_data", "02_feature_extraction", "03_round1_encoders_pooling", "04_round2_objectives",
            "05_round3_backbones", "06_round4_multitask", "07_significance", "08_visualizations", "09_predict_and_submit"]


def test_the_suite_is_numbered_in_running_order():
    assert [p.stem for p in notebook_paths()] == EXPECTED


@pytest.mark.parametrize("path", notebook_paths(), ids=lambda p: p.stem)
def test_notebook_layout(path):
    nb = nbformat.read(str(path), as_version=4)
    assert nb.cells[0].cell_type == "markdown" and "writes" in nb.cells[0].source.lower()
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert "google.colab" in code[0].source and "drive.mount" in code[0].source
    assert code[1].metadata.get("tags") == ["parameters"]
    for name in ("PROFILE", "DATA_ROOT", "RUN_ROOT", "SEEDS", "EPOCHS", "DEVICE"):
        assert re.search(rf"^{name} = ", code[1].source, re.M), name
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


def test_all_notebooks_run_headless_on_the_small_demo(tmp_path):
    root = tmp_path / "demo"
    executed = run_notebooks(root, dict(SMALL_PARAMETERS))
    assert [p.stem for p in executed] == EXPECTED
    report = root / "report"
    for table in ("table2_round1", "table3_round2", "table4_round3", "table5_round4"):
        text = (report / f"{table}.md").read_text()
        assert "Test - Task_A" in text and "Train-Task_B" in text
    names = {p.name for p in report.glob("*.png")}
    for part in ("tsne", "self_attention", "cross_attention", "tukey", "box"):
        assert any(part in n for n in names), part
    assert list(report.glob("*tukey*.csv"))
    # experiment 02 runs in rounds 1 and 2, but is trained once and reused
    assert len(list((root / "runs").glob("round*/02-seed0/log.jsonl"))) == 1
    # scaled-down epochs keep the paper's ratio: experiment 30 trains twice as long as 10
    epochs = {name: json.loads(next((root / "runs").glob(f"round*/{name}-seed0/config.json")).read_text())["train"]["epochs"]
              for name in ("10", "30")}
    assert epochs == {"10": SMALL_PARAMETERS["EPOCHS"], "30": 2 * SMALL_PARAMETERS["EPOCHS"]}
    # re-running a round notebook trains nothing again
    rerun = run_notebooks(root, dict(SMALL_PARAMETERS), names=["04"])[0]
    text = rerun.read_text()
    assert "reused" in text and "train 10" not in text
