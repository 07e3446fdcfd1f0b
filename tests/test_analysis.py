"""Tests for mamikit.analysis: tables 2-5, Tukey HSD, box plots and the report command."""

from __future__ import annotations

import dataclasses
import json
import re
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mamikit import analysis
from mamikit.cli import main

CONFIGS = {
    "00": dict(xformer_enc="shared", pooling="cls", proj_align=False, contrastive=False, multi_task=False,
               backbones=["clip", "detr"]),
    "01": dict(xformer_enc="shared", pooling="none", proj_align=False, contrastive=False, multi_task=False,
               backbones=["clip", "detr"]),
    "02": dict(xformer_enc="multi", pooling="none", proj_align=False, contrastive=False, multi_task=False,
               backbones=["clip", "detr"]),
    "03": dict(xformer_enc="multi", pooling="txt_cls", proj_align=False, contrastive=False, multi_task=False,
               backbones=["clip", "detr"]),
    "10": dict(xformer_enc="multi", pooling="none", proj_align=True, contrastive=False, multi_task=False,
               backbones=["clip", "detr"]),
    "20": dict(xformer_enc="multi", pooling="none", proj_align=True, contrastive=False, multi_task=False,
               backbones=["clip"]),
    "30": dict(xformer_enc="multi", pooling="none", proj_align=True, contrastive=False, multi_task=True,
               backbones=["clip", "detr"]),
}


def _scores(experiment: str, seed: int, n_evals: int) -> dict:
    """Deterministic official scores per (split, task): list over evaluations."""
    rng = np.random.default_rng(1000 * int(experiment) + seed)
    base = 0.55 + 0.02 * int(experiment[0]) + 0.01 * int(experiment[1])
    out = {}
    for split, lift in (("train", 0.2), ("dev", 0.1), ("test", 0.0)):
        for task, drop in (("Task_A", 0.0), ("Task_B", 0.07)):
            out[(split, task)] = list(np.round(base + lift - drop + rng.normal(0, 0.02, n_evals), 6))
    return out


def _write_run(root: Path, folder: str, experiment: str, seed: int, n_evals: int = 8, truncate: bool = False) -> dict:
    """A run directory with config.json and log.jsonl like the trainer's; returns its scores."""
    run = root / folder / f"{experiment}-seed{seed}"
    run.mkdir(parents=True)
    config = {"experiment": dict(name=experiment, epochs=2, **CONFIGS[experiment]), "train": {"seed": seed},
              "profile": {"name": "demo"}}
    (run / "config.json").write_text(json.dumps(config))
    scores = _scores(experiment, seed, n_evals)
    lines = []
    for step in range(n_evals):
        for (split, task), values in scores.items():
            common = {"experiment": experiment, "seed": seed, "epoch": step // 4, "step": 10 * (step + 1),
                      "split": split, "task": task}
            lines.append({**common, "label": None, "metric": "score", "value": values[step]})
            lines.append({**common, "label": "misogynous", "metric": "auc", "value": 0.99})  # must not count
    text = "".join(json.dumps(r) + "\n" for r in lines)
    if truncate:
        text += json.dumps(lines[0])[:25]  # killed mid-write: no newline, half a row
    (run / "log.jsonl").write_text(text)
    return scores


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """round1: 00, 01 (two seeds), 02 (two seeds), 03; round2: 02, 10; round4: 30 (truncated log)."""
    root = tmp_path_factory.mktemp("runs")
    scores = {}
    for folder, exp, seeds in (("round1", "00", [0]), ("round1", "01", [0, 1]), ("round1", "02", [0, 1]),
                               ("round1", "03", [0]), ("round2", "10", [0]), ("round4", "30", [0])):
        for s in seeds:
            scores[(exp, s)] = _write_run(root, folder, exp, s, truncate=exp == "30")
    return root, scores


def _read(root):
    return analysis.read_logs(root)


def test_read_logs_skips_truncated_last_line_with_warning(runs, caplog):
    root, _ = runs
    logs = analysis.read_logs(root)
    assert re.search(r"30-seed0[/\\]log.jsonl line 97: truncated last line", caplog.text)
    assert len(logs) == 8 * 6 * 2 * 8  # 8 runs x 8 evaluations x 6 split-tasks x 2 rows
    assert {"run_dir", "run"} <= set(logs.columns)
    assert set(logs.loc[logs["experiment"] == "30", "run"]) == {"round4/30-seed0"}


def test_read_logs_malformed_middle_line_warns_and_keeps_the_rest(tmp_path, caplog):
    run = tmp_path / "02-seed0"
    run.mkdir()
    row = {"experiment": "02", "seed": 0, "epoch": 0, "step": 1, "split": "test", "task": "Task_A", "label": None,
           "metric": "score", "value": 0.5}
    (run / "log.jsonl").write_text(json.dumps(row) + "\n{oops\n" + json.dumps({**row, "step": 2}) + "\n")
    logs = analysis.read_logs(tmp_path)
    assert "line 2: malformed line" in caplog.text and caplog.records[-1].levelname == "WARNING"
    assert list(logs["step"]) == [1, 2]


def test_experiment_table_matches_hand_computation(runs):
    root, scores = runs
    table = analysis.experiment_table(_read(root), ["00", "01", "02", "03"])
    # Per run the max over evaluations, then mean and sample std over seeds.
    for exp, seeds in (("00", [0]), ("01", [0, 1]), ("02", [0, 1])):
        for split, row in (("test", "Test - Task_A"), ("dev", "Dev - Task_B"), ("train", "Train-Task_A")):
            task = row[-6:]
            maxes = [max(scores[(exp, s)][(split, task)]) for s in seeds]
            assert table.mean.at[row, exp] == pytest.approx(np.mean(maxes), abs=1e-12)
            if len(seeds) > 1:
                assert table.std.at[row, exp] == pytest.approx(np.std(maxes, ddof=1), abs=1e-12)
            else:
                assert np.isnan(table.std.at[row, exp])
    assert list(table.mean.index) == ["Test - Task_A", "Test - Task_B", "Dev - Task_A", "Dev - Task_B",
                                      "Train-Task_A", "Train-Task_B"]
    # no recipe recorded: blank
    assert table.config["00"].tolist() == ["", "Shared", "[CLS]", "No", "No", "No", "CLIP and DETR"]
    assert table.config["03"].tolist() == ["", "Multi", "txt [CLS]", "No", "No", "No", "CLIP and DETR"]
    assert table.runs.tolist() == [1, 2, 2, 1]


def test_table_markdown_and_csv(runs, tmp_path):
    root, scores = runs
    table = analysis.experiment_table(_read(root), ["01", "00", "99"])  # order kept, missing 99 dropped
    md = table.to_markdown()
    lines = md.splitlines()
    assert [c.strip() for c in lines[0].strip("|").split("|")] == ["Experiment", "01", "00"]
    maxes = [max(scores[("01", s)][("test", "Task_A")]) for s in (0, 1)]
    expected = f"{np.mean(maxes):.4f} ± {np.std(maxes, ddof=1):.4f}"
    single = max(scores[("00", 0)][("test", "Task_A")])
    test_a = next(line for line in lines if line.startswith("| Test - Task_A"))
    # the row's best mean is bold
    cells = [expected, f"**{single:.4f}**"] if single > np.mean(maxes) else [f"**{expected}**", f"{single:.4f}"]
    assert [c.strip() for c in test_a.strip("|").split("|")] == ["Test - Task_A", *cells]
    assert any(line.startswith("| **Score**") for line in lines)
    assert len({len(line) for line in lines}) == 1  # aligned columns
    assert "**" not in table.to_markdown(bold_best=False).replace("**Score**", "")
    md_path, csv_path, tex_path = table.save(tmp_path / "table2_round1")
    assert md_path.read_text().strip() == md and tex_path.read_text().strip() == table.to_latex()
    csv = pd.read_csv(csv_path, dtype=str, keep_default_na=False).set_index("row")
    assert list(csv.columns) == ["01", "01_std", "00", "00_std"]
    assert csv.at["Pooling", "00"] == "[CLS]" and csv.at["Runs", "01"] == "2"
    assert float(csv.at["Test - Task_A", "01"]) == pytest.approx(np.mean(maxes))
    assert float(csv.at["Test - Task_A", "01_std"]) == pytest.approx(np.std(maxes, ddof=1))
    assert csv.at["Test - Task_A", "00_std"] == ""


def _latex_rows(tex: str) -> dict[str, list[str]]:
    """The body rows of a LaTeX tabular: first cell -> the other cells."""
    rows = {}
    for line in tex.splitlines():
        if line.endswith(r"\\"):
            cells = [c.strip() for c in line[:-2].split(" & ")]
            rows[cells[0]] = cells[1:]
    return rows


@pytest.mark.smoke
def test_table_latex_is_booktabs_with_the_best_cells_bold(runs):
    root, scores = runs
    table = analysis.experiment_table(_read(root), ["00", "01", "02", "03"])
    tex = table.to_latex()
    lines = tex.splitlines()
    assert lines[0] == r"\begin{tabular}{lcccc}" and lines[1] == r"\toprule" and lines[-1] == r"\end{tabular}"
    assert lines[-2] == r"\bottomrule" and lines.count(r"\midrule") == 2  # below the header, above the scores
    assert lines[lines.index(r"\midrule", 4) + 1].startswith(r"Test - Task\_A &")  # escaped underscores
    rows = _latex_rows(tex)
    assert rows["Experiment"] == ["00", "01", "02", "03"] and rows["Pooling"] == ["[CLS]", "No", "No", "txt [CLS]"]
    for row, (split, task) in (("Test - Task\\_A", ("test", "Task_A")), ("Dev - Task\\_B", ("dev", "Task_B"))):
        means = {e: np.mean([max(scores[(e, s)][(split, task)]) for s in seeds])
                 for e, seeds in (("00", [0]), ("01", [0, 1]), ("02", [0, 1]), ("03", [0]))}
        best = max(means, key=means.get)
        for e, cell in zip(["00", "01", "02", "03"], rows[row]):
            assert cell.startswith(r"\bfseries ") == (e == best), (row, e, cell)
            assert cell.removeprefix(r"\bfseries ").startswith(f"{means[e]:.4f}")
    assert r"$\pm$" in rows["Test - Task\\_A"][1] and "±" not in tex  # 01: two seeds
    assert r"\bfseries" not in table.to_latex(bold_best=False)


def test_markdown_table_escapes_pipes():
    frame = pd.DataFrame({"a|b": ["x|y", None]}, index=["r1", "r2"])
    assert analysis.markdown_table(frame, "name").splitlines() == ["| name | a\\|b |", "|------|------|",
                                                                   "| r1   | x\\|y |", "| r2   |      |"]


def test_tukey_frame_equals_statsmodels(runs):
    from statsmodels.stats.multicomp import pairwise_tukeyhsd

    root, scores = runs
    logs = _read(root)
    frame = analysis.evaluation_scores(logs, "Task_A", ["00", "01", "02"])
    pooled = {e: [v for (x, s), sc in scores.items() if x == e for v in sc[("test", "Task_A")]]
              for e in ("00", "01", "02")}
    assert {g: sorted(v) for g, v in frame.groupby("group")["score"]} == {g: sorted(v) for g, v in pooled.items()}
    data = np.concatenate(list(pooled.values()))
    groups = np.repeat(list(pooled), [len(v) for v in pooled.values()])
    expected = pairwise_tukeyhsd(data, groups)
    table = expected.summary().data
    got = analysis.tukey_frame(analysis.tukey(frame))
    assert list(got.columns) == table[0] == ["group1", "group2", "meandiff", "p-adj", "lower", "upper", "reject"]
    ref = pd.DataFrame(table[1:], columns=table[0])
    assert (got[["group1", "group2"]].astype(str).values.tolist()
            == ref[["group1", "group2"]].astype(str).values.tolist())
    for col in ("meandiff", "p-adj", "lower", "upper"):
        # summary rounds to 4
        np.testing.assert_allclose(got[col].to_numpy(float), ref[col].to_numpy(float), atol=5.1e-5)
    np.testing.assert_allclose(got["meandiff"], expected.meandiffs, rtol=1e-12)
    assert got["reject"].tolist() == [bool(r) for r in expected.reject]


def test_tukey_groups_by_run(runs):
    root, _ = runs
    frame = analysis.evaluation_scores(_read(root), "Task_B", ["01", "02"], by="run")
    assert sorted(frame["group"].unique()) == ["01-seed0", "01-seed1", "02-seed0", "02-seed1"]
    assert len(analysis.tukey_frame(analysis.tukey(frame))) == 6


def test_tukey_refuses_single_group_and_too_few_scores():
    from mamikit.utils import MamikitError

    with pytest.raises(MamikitError, match="at least two groups"):
        analysis.tukey(pd.DataFrame({"group": ["10"] * 5, "score": np.arange(5.0)}))
    with pytest.raises(MamikitError, match="too few evaluations"):
        analysis.tukey(pd.DataFrame({"group": ["10", "30"], "score": [0.1, 0.2]}))


def test_box_and_tukey_plots_have_expected_size(runs, tmp_path):
    from PIL import Image

    root, _ = runs
    frame = analysis.evaluation_scores(_read(root), "Task_A", ["00", "01", "02", "03"])
    fig = analysis.plot_box(frame, "round1", "Task_A score", path=tmp_path / "box.png")
    assert Image.open(tmp_path / "box.png").size == tuple(int(round(v)) for v in fig.get_size_inches() * fig.dpi)
    assert (tmp_path / "box.pdf").read_bytes()[:4] == b"%PDF"
    # by default a paper experiment is named with what tells it apart from the others, from the registry
    names = ["00: Shared encoder, [CLS] pooling", "01: Shared encoder, no pooling", "02: Multi encoder, no pooling",
             "03: Multi encoder, txt [CLS] pooling"]
    assert [t.get_text().replace("\n", " ") for t in fig.axes[0].get_xticklabels()] == [
        n.replace(": ", " ") for n in names]
    assert fig.axes[0].get_xlabel() == "experiment"
    fig = analysis.plot_tukey(analysis.tukey(frame), "round1", "Task_A score", path=tmp_path / "tukey.png")
    assert Image.open(tmp_path / "tukey.png").size == tuple(int(round(v)) for v in fig.get_size_inches() * fig.dpi)
    assert (tmp_path / "tukey.pdf").read_bytes()[:4] == b"%PDF"
    assert fig.axes[0].get_title() == "round1" and "Task_A score" in fig.axes[0].get_xlabel()
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == names  # bottom to top: the groups' order
    fig = analysis.plot_tukey(analysis.tukey(frame), labels={"01": "one", "03": "three"})
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == ["00", "one", "02", "three"]


def test_box_plot_of_runs_names_each_run_with_its_experiments_switches(runs):
    root, _ = runs
    logs = _read(root)
    frame = analysis.evaluation_scores(logs, "Task_A", ["00", "01"], by="run")
    labels = analysis.group_labels(frame, analysis.experiment_configs(logs))
    assert labels == {"00-seed0": "00-seed0: [CLS] pooling", "01-seed0": "01-seed0: no pooling",
                      "01-seed1": "01-seed1: no pooling"}
    fig = analysis.plot_box(frame, labels=labels)  # long labels wrap to a box's width
    assert [t.get_text().replace("\n", " ") for t in fig.axes[0].get_xticklabels()] == [
        labels[g] for g in ("00-seed0", "01-seed0", "01-seed1")]
    assert fig.axes[0].get_xlabel() == "run"


def test_experiment_descriptions_name_the_switches_that_differ():
    assert analysis.experiment_labels(["02", "10", "12", "13"]) == {
        "02": "02", "10": "10: Proj Algn", "12": "12: Contrastive", "13": "13: Proj Algn, Contrastive"}
    assert analysis.experiment_descriptions(["10", "20", "21"]) == {"10": "CLIP and DETR", "20": "CLIP", "21": "DETR"}
    assert analysis.experiment_labels(["10", "30"], sep="\n") == {"10": "10", "30": "30\nMulti-task"}
    assert analysis.experiment_labels(["30"]) == {"30": "30"}  # alone, nothing tells it apart
    # a recorded configuration wins over the registry; an unknown experiment without one stays bare
    recorded = {"02": dict(CONFIGS["02"], recipe="authors"), "x7": dict(CONFIGS["02"], recipe="paper")}
    assert analysis.experiment_descriptions(["02", "x7", "zz"], recorded) == {
        "02": "authors recipe", "x7": "paper recipe", "zz": ""}


def test_captions_say_which_evaluations_are_pooled(runs):
    root, scores = runs
    logs = _read(root)
    frame = analysis.evaluation_scores(logs, "Task_B", ["00", "01", "02"])
    counts = {e: sum(len(sc[("test", "Task_B")]) for (x, s), sc in scores.items() if x == e) for e in ("00", "01")}
    assert counts == {"00": 8, "01": 16}
    pooled = analysis.pooled_evaluations(frame)
    assert pooled == ("every evaluation of every seed, pooled per experiment (00: 8 evaluations of 1 seed; "
                      "01: 16 evaluations of 2 seeds; 02: 16 evaluations of 2 seeds)")
    assert analysis.box_caption(frame, "Task_B").endswith(pooled + ".")
    assert "Task_B score on the test split" in analysis.box_caption(frame, "Task_B")
    caption = analysis.tukey_caption(frame, "Task_B", alpha=0.1)
    assert "simultaneous 90% intervals" in caption and caption.endswith(pooled + ".")
    by_run = analysis.pooled_evaluations(analysis.evaluation_scores(logs, "Task_B", ["01"], by="run"))
    assert by_run == "every evaluation, one group per run (01-seed0: 8 evaluations; 01-seed1: 8 evaluations)"


def test_pick_figure_run_prefers_30_then_best_decoder(runs):
    root, _ = runs
    logs = _read(root)
    assert analysis.pick_figure_run(logs).endswith("30-seed0")
    no30 = logs[logs["experiment"].isin(["00", "01"])]
    picked = analysis.pick_figure_run(no30)
    assert "01-seed" in picked  # 00 has no decoder ([CLS] pooling)
    assert analysis.pick_figure_run(logs[logs["experiment"] == "00"]) is None


def test_report_cli_writes_tables_tukey_and_box(runs, tmp_path, capsys, caplog):
    root, _ = runs
    caplog.set_level("INFO", logger="mamikit")
    out = tmp_path / "report"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["report", str(root), "--out", str(out)]) == 0
    names = sorted(p.name for p in out.iterdir())
    for stem in ("table2_round1", "table3_round2", "table5_round4"):
        assert f"{stem}.md" in names and f"{stem}.csv" in names
    assert "table4_round3.md" in names  # 10 (from the round2 folder) is in round 3's list
    assert not any(n.startswith("tukey_round3") for n in names)  # a single experiment: nothing to compare
    for task in ("Task_A", "Task_B"):
        assert f"tukey_round1_{task}.csv" in names and f"tukey_round1_{task}.png" in names
        assert f"box_round1_{task}.png" in names and f"box_round2_{task}.png" in names
    printed = caplog.text  # progress lines go through the "mamikit" logger; the command's result to stdout
    assert "round3: experiments 10" in printed and "Tukey HSD skipped: needs at least two groups" in printed
    assert "figures 3-4 skipped" in printed  # no trained model in this tree
    assert str(out / "table2_round1.md") in printed
    assert capsys.readouterr().out.startswith("report: ")
    t2 = pd.read_csv(out / "table2_round1.csv", dtype=str, keep_default_na=False)
    assert list(t2.columns) == ["row", "00", "00_std", "01", "01_std", "02", "02_std", "03", "03_std"]
    tk = pd.read_csv(out / "tukey_round1_Task_A.csv")
    assert list(tk.columns) == ["group1", "group2", "meandiff", "p-adj", "lower", "upper", "reject"] and len(tk) == 6


def test_report_writes_every_figure_as_png_and_pdf_with_a_caption_and_every_table_in_latex(runs, tmp_path):
    root, scores = runs
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        written = analysis.write_report(root, tmp_path, figures=False)
    names = {p.name for p in tmp_path.iterdir()}
    assert sorted(p.name for p in written) == sorted(names)  # what it lists is what it wrote
    stems = {n.removesuffix(".png") for n in names if n.endswith(".png")}
    assert {"box_round1_Task_A", "box_round4_Task_B", "tukey_round2_Task_A", "tukey_round4_Task_B"} <= stems
    for stem in stems:
        assert (tmp_path / f"{stem}.pdf").read_bytes()[:4] == b"%PDF"
        assert f"{stem}.caption.txt" in names
    tables = {n.removesuffix(".csv") for n in names if n.endswith(".csv")}
    assert {"table2_round1", "table5_round4", "tukey_round1_Task_A", "tukey_round4_Task_B"} <= tables
    for stem in tables:
        tex = (tmp_path / f"{stem}.tex").read_text()
        assert tex.startswith("\\begin{tabular}") and "\\toprule" in tex and "\\bottomrule" in tex
        assert (tmp_path / f"{stem}.md").read_text().startswith("| ")
    # the captions count the pooled evaluations: 02 has two seeds of 8 evaluations, 10 one
    n_02 = sum(len(sc[("test", "Task_A")]) for (e, _), sc in scores.items() if e == "02")
    caption = (tmp_path / "box_round2_Task_A.caption.txt").read_text()
    assert f"02: {n_02} evaluations of 2 seeds; 10: 8 evaluations of 1 seed" in caption and n_02 == 16
    assert "every evaluation of every seed" in (tmp_path / "tukey_round2_Task_A.caption.txt").read_text()


def test_report_cli_empty_folder_is_an_error(tmp_path, capsys):
    assert main(["report", str(tmp_path), "--out", str(tmp_path / "r")]) == 2
    assert "no run logs" in capsys.readouterr().err


def test_round_5_labels_name_the_one_change_of_each_experiment_and_tables_2_to_5_keep_the_papers_rows():
    from mamikit.analysis import config_display, experiment_descriptions, shown_rows
    from mamikit.experiments import EXPERIMENTS

    assert experiment_descriptions(["30", "40", "41", "42"]) == {
        "30": "", "40": "Query Algn", "41": "vit-l-14 backbones", "42": "+ HSText"}
    assert experiment_descriptions(["10", "30"]) == {"10": "", "30": "Multi-task"}
    shown = [config_display(dataclasses.asdict(EXPERIMENTS[e])) for e in ("10", "30")]
    assert shown_rows(shown)[-1] == "Backbones"  # no row beyond the paper's where every switch is off
    shown += [config_display(dataclasses.asdict(EXPERIMENTS["42"]))]
    assert shown_rows(shown)[-1] == "Extra data"
