"""The paper's experiments and rounds (tables 2-5) by name, and round 5 (table 6)."""

import dataclasses
import json

import pytest

from mamikit.experiments import (FUTURE_EXPERIMENTS, PAPER_EXPERIMENTS, PAPER_ROUNDS, ROUND_TABLES, ROUNDS, Experiment,
                                 get_experiment)
from mamikit.utils import MamikitError


def test_table_configurations_match_the_paper():
    # Tables 2-5: (xformer_enc, pooling, proj_align, contrastive, multi_task, image_encoders)
    expected = {
        "00": ("shared", "cls", False, False, False, ("clip", "detr")),
        "01": ("shared", "none", False, False, False, ("clip", "detr")),
        "02": ("multi", "none", False, False, False, ("clip", "detr")),
        "03": ("multi", "txt_cls", False, False, False, ("clip", "detr")),
        "10": ("multi", "none", True, False, False, ("clip", "detr")),
        "12": ("multi", "none", False, True, False, ("clip", "detr")),
        "13": ("multi", "none", True, True, False, ("clip", "detr")),
        "20": ("multi", "none", True, False, False, ("clip",)),
        "21": ("multi", "none", True, False, False, ("detr",)),
        "30": ("multi", "none", True, False, True, ("clip", "detr")),
    }
    assert set(PAPER_EXPERIMENTS) == set(expected)
    for name, fields in expected.items():
        e = PAPER_EXPERIMENTS[name]
        assert (e.xformer_enc, e.pooling, e.proj_align, e.contrastive, e.multi_task, e.image_encoders) == fields, name
        assert e.epochs == (30 if name == "30" else 15)
    assert PAPER_EXPERIMENTS["30"].datasets == ("MAMI", "FBHM")
    assert PAPER_EXPERIMENTS["10"].datasets == ("MAMI",)


def test_rounds_start_from_the_previous_winner():
    paper = {r: names for r, names in ROUNDS.items() if r in PAPER_ROUNDS}
    assert paper == {1: ["00", "01", "02", "03"], 2: ["02", "10", "12", "13"], 3: ["10", "20", "21"], 4: ["10", "30"]}
    assert all(name in PAPER_EXPERIMENTS for names in paper.values() for name in names)
    assert sorted(ROUNDS) == [1, 2, 3, 4, 5] and ROUND_TABLES[5] == 6


def test_round_5_is_experiment_30_with_one_change_each():
    assert ROUNDS[5][0] == "30" and set(ROUNDS[5][1:]) == set(FUTURE_EXPERIMENTS)
    assert not set(FUTURE_EXPERIMENTS) & set(PAPER_EXPERIMENTS)
    base = dataclasses.asdict(get_experiment("30"))
    for name in FUTURE_EXPERIMENTS:
        changed = {k for k, v in dataclasses.asdict(get_experiment(name)).items() if v != base[k]}
        assert len(changed - {"name"}) == 1, (name, changed)
    assert get_experiment("40").query_align and get_experiment("40", recipe="authors").query_align
    assert get_experiment("40").display()["Query Algn"] == "Yes"


def test_display_rows_follow_the_tables():
    assert PAPER_EXPERIMENTS["03"].display() == {
        "Recipe": "paper", "Xformer Enc": "Multi", "Pooling": "txt [CLS]", "Proj Algn": "No",
        "Contrastive": "No", "Multi-task": "No", "Backbones": "CLIP and DETR", "Query Algn": "No",
        "Profile": "",
        "Extra data": "No",
    }
    assert PAPER_EXPERIMENTS["00"].display()["Pooling"] == "[CLS]"
    assert PAPER_EXPERIMENTS["21"].display()["Backbones"] == "DETR"


def test_overrides_and_invalid_combinations():
    e = get_experiment("10", contrastive=True, image_encoders=("detr", "clip"))
    assert e.contrastive and e.image_encoders == ("clip", "detr")
    with pytest.raises(MamikitError, match="unknown experiment"):
        get_experiment("99")
    with pytest.raises(MamikitError, match="nope"):
        get_experiment("10", nope=1)
    with pytest.raises(MamikitError, match="shared"):
        get_experiment("02", pooling="cls")
    with pytest.raises(MamikitError, match="multi"):
        get_experiment("00", pooling="txt_cls")
    with pytest.raises(MamikitError, match="image_encoders"):
        get_experiment("10", image_encoders=("resnet",))
    with pytest.raises(TypeError):
        dataclasses.replace(PAPER_EXPERIMENTS["10"], nope=1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        PAPER_EXPERIMENTS["10"].epochs = 3  # type: ignore[misc]
    assert isinstance(PAPER_EXPERIMENTS["10"], Experiment)


def test_a_model_configuration_reads_every_switch_from_its_experiment():
    """One home per value: ModelConfig holds the experiment, no copy of its switches or the profile's sizes."""
    from mamikit.data import load_tasks
    from mamikit.model import MODEL_SIZES, MODEL_SWITCHES, ModelConfig
    from mamikit.profiles import Profile

    own = {f.name for f in dataclasses.fields(ModelConfig)}
    # Experiment.profile is a profile's name; ModelConfig.profile the Profile it resolves to (train.run_profile)
    assert not own & {f.name for f in dataclasses.fields(Experiment)} - {"name", "profile"}
    assert not own & {f.name for f in dataclasses.fields(Profile)} - {"name"}
    experiment = get_experiment("21", recipe="authors")
    cfg = _model_config(experiment, load_tasks()["MAMI"])
    assert {name: getattr(cfg, name) for name in MODEL_SWITCHES} == {name: getattr(experiment, name)
                                                                    for name in MODEL_SWITCHES}
    assert [getattr(cfg, name) for name in MODEL_SIZES] == [getattr(cfg.profile, name) for name in MODEL_SIZES]


def _model_config(experiment, tasks):
    from mamikit.model import ModelConfig
    from mamikit.profiles import get_profile

    return ModelConfig.from_experiment(experiment, get_profile("paper"), {}, tasks, cls_token_id=101, sep_token_id=102)


def test_recipes_set_their_switches():
    from mamikit.experiments import RECIPES, SWITCHES, recipe_switches

    paper, authors = recipe_switches("paper"), recipe_switches("authors")
    assert set(paper) == set(authors) == set(SWITCHES)
    assert paper["per_task_decoding"] and paper["pos_weight"] and paper["bert_pooler"] and paper["detr_slot_positions"]
    assert paper["head_dropout"] == 0.1 and not paper["text_dropout_in_train"] and not paper["align_all_pairs"]
    assert {k for k in SWITCHES if paper[k] != authors[k]} == set(RECIPES["authors"])
    e = get_experiment("12", recipe="authors")
    assert e.recipe == "authors" and e.switches() == authors
    from mamikit.data import load_tasks

    tasks = load_tasks()["MAMI"]
    assert _model_config(e, tasks).head_gelu  # 12 trains the contrastive loss: the authors' head keeps its GELU
    assert not _model_config(get_experiment("10", recipe="authors"), tasks).head_gelu
    assert _model_config(get_experiment("10"), tasks).head_gelu
    assert get_experiment("10", recipe="authors", align_all_pairs=False).align_all_pairs is False
    with pytest.raises(MamikitError, match="recipe"):
        get_experiment("10", recipe="mine")
    with pytest.raises(MamikitError, match="recipe"):
        dataclasses.replace(PAPER_EXPERIMENTS["10"], recipe="mine")


def test_every_switch_of_docs_fidelity_is_an_experiment_field_and_back():
    import re
    from pathlib import Path

    from mamikit.experiments import SWITCHES

    doc = (Path(__file__).resolve().parents[1] / "docs" / "fidelity.md").read_text(encoding="utf-8")
    rows = [line for line in doc.splitlines() if re.match(r"\| \d+ \|", line)]  # the table's numbered points
    named = {re.findall(r"`([a-z_]+)`", row.rstrip(" |").rsplit("|", 1)[-1])[0] for row in rows}
    fields = {f.name for f in dataclasses.fields(Experiment)}
    assert named <= fields
    assert named == set(SWITCHES)


def test_authors_recipe_switches_of_rows_8_11_12_13_18():
    paper, authors = get_experiment("13"), get_experiment("13", recipe="authors")
    assert not (paper.contrastive_as_coded or paper.segments_as_coded or paper.authors_split
                or paper.tied_text_embeddings)
    assert paper.text_tokens is None  # the store's length
    assert authors.contrastive_as_coded and authors.authors_split and authors.text_tokens == 121
    assert authors.segments_as_coded and authors.tied_text_embeddings
    assert not paper.tied_text_embeddings
    assert Experiment.from_dict({k: v for k, v in dataclasses.asdict(paper).items() if k != "authors_split"}) == paper
    with pytest.raises(MamikitError, match="text_tokens"):
        get_experiment("10", text_tokens=2)


def test_query_align_is_off_in_the_paper_and_beyond_its_tables():
    """Section 6's future work: a switch of its own, off in every experiment of tables 2-5 and in both recipes."""
    from mamikit.experiments import EXTRA_ROWS, SWITCHES, TABLE_ROWS

    assert not any(e.query_align for e in PAPER_EXPERIMENTS.values())
    assert not any(get_experiment(name, recipe="authors").query_align for name in PAPER_EXPERIMENTS)
    assert "query_align" not in SWITCHES  # not a recipe switch: the authors' code has no such loss
    assert ("query_align", "Query Algn") in EXTRA_ROWS and "query_align" not in dict(TABLE_ROWS)
    e = get_experiment("30", query_align=True)
    assert e.query_align and e.proj_align and e.multi_task and e.epochs == 30
    assert e.display()["Query Algn"] == "Yes"
    assert dataclasses.replace(e, query_align=False) == PAPER_EXPERIMENTS["30"]
    with pytest.raises(MamikitError, match="query_align needs the decoder"):
        get_experiment("00", query_align=True)  # [CLS] pooling: no class queries


def test_a_run_recorded_before_query_align_reads_with_it_off():
    recorded = {k: v for k, v in dataclasses.asdict(PAPER_EXPERIMENTS["30"]).items() if k != "query_align"}
    assert Experiment.from_dict(recorded) == PAPER_EXPERIMENTS["30"]
    assert Experiment.from_dict(dataclasses.asdict(get_experiment("30", query_align=True))).query_align


def test_extra_datasets_join_after_the_multi_task_ones_and_are_checked():
    """Section 7's more datasets: a text-only corpus joins through extra_datasets only; 30 itself is unchanged."""
    from mamikit.experiments import EXTRA_ROWS
    from mamikit.registry import dataset_modalities, multi_task_datasets

    assert dataset_modalities("HSText") == ("text",) and dataset_modalities("FBHM") == ("image", "text")
    assert multi_task_datasets() == ("FBHM",)  # the text-only corpus is no multi-task default
    assert PAPER_EXPERIMENTS["30"].datasets == ("MAMI", "FBHM") and PAPER_EXPERIMENTS["30"].extra_datasets == ()
    e = get_experiment("30", extra_datasets=("HSText",), epochs=1)
    assert e.datasets == ("MAMI", "FBHM", "HSText")
    assert get_experiment("10", extra_datasets="HSText").datasets == ("MAMI", "HSText")
    assert ("extra_datasets", "Extra data") in EXTRA_ROWS and e.display()["Extra data"] == "HSText"
    with pytest.raises(MamikitError, match="'NOPE' is not in .*tasks.json"):
        get_experiment("30", extra_datasets=("NOPE",))
    with pytest.raises(MamikitError, match="already trained by multi_task"):
        get_experiment("30", extra_datasets=("FBHM",))
    with pytest.raises(MamikitError, match="names a dataset twice"):
        get_experiment("10", extra_datasets=("HSText", "HSText"))
    # recorded without the field: no extra dataset; recorded with it (a JSON list): a tuple again
    recorded = {k: v for k, v in dataclasses.asdict(PAPER_EXPERIMENTS["30"]).items() if k != "extra_datasets"}
    assert Experiment.from_dict(recorded) == PAPER_EXPERIMENTS["30"]
    assert Experiment.from_dict(json.loads(json.dumps(dataclasses.asdict(e)))) == e


def test_a_run_recorded_before_extra_datasets_compares_equal():
    from mamikit.runs import recorded_values

    new = json.loads(json.dumps(dataclasses.asdict(PAPER_EXPERIMENTS["30"])))
    old = {k: v for k, v in new.items() if k not in ("extra_datasets", "query_align")}
    assert recorded_values("experiment", old) == recorded_values("experiment", new)
    with_extra = dict(new, extra_datasets=["HSText"])
    assert recorded_values("experiment", old) != recorded_values("experiment", with_extra)
