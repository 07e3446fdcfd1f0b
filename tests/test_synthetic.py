"""Synthetic meme sets: determinism, documented ground truth and ceilings, official layouts."""

import math

import numpy as np
import pytest

from mamikit import synthetic
from mamikit.cli import main
from mamikit.data import check, load_datasets
from mamikit.synthetic import EXPECTED_CEILINGS, SUB_LABELS, ceilings, generate, sample_fbhm, sample_mami
from mamikit.utils import MamikitError, open_image_rgb

SMALL = {"n_mami": 100, "n_mami_test": 20, "n_fbhm": 60}


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def small_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth") / "data"
    info = generate(root, seed=5, progress=False, **SMALL)
    return root, info


def test_same_seed_gives_identical_bytes_and_other_seeds_differ(tmp_path, small_set):
    root, _ = small_set
    again = tmp_path / "again"
    generate(again, seed=5, progress=False, **SMALL)
    a, b = _files(root), _files(again)
    assert a.keys() == b.keys()
    assert all(a[k] == b[k] for k in a)
    other = tmp_path / "other"
    generate(other, seed=6, progress=False, **SMALL)
    c = _files(other)
    assert c["MAMI/TRAINING/training.csv"] != a["MAMI/TRAINING/training.csv"]
    assert c["FBHM/train.jsonl"] != a["FBHM/train.jsonl"]


def test_load_datasets_gives_documented_counts(small_set):
    root, info = small_set
    assert info["counts"]["MAMI"] == {"training": 100, "inconsistent": 1, "usable": 99, "test": 20}
    assert info["counts"]["FBHM"] == {"train": 50, "dev_seen": 10}
    data = load_datasets(root, split_seed=0)
    mami, fbhm = data["MAMI"], data["FBHM"]
    assert mami.problems == [] and fbhm.problems == []
    assert mami.dropped_inconsistent == 1
    assert mami.counts() == {"train": 99 - math.ceil(0.2 * 99), "dev": math.ceil(0.2 * 99), "test": 20}
    assert fbhm.counts() == {"train": 40, "dev": 10, "test": 10}
    assert (mami.splits["test"][list(mami.labels)] >= 0).all().all()  # the test set is labelled


def test_generated_images_decode_and_carry_the_colour_cue(small_set):
    root, _ = small_set
    assert all(not ds.problems for ds in check(root, progress=False).values())
    f = sample_mami(np.random.default_rng(np.random.SeedSequence([5, 1]).spawn(2)[0]), 100, n_inconsistent=1)
    df = load_datasets(root)["MAMI"]
    names = [line.split("\t")[0] for line in (root / "MAMI/TRAINING/training.csv").read_text().splitlines()[1:]]
    for i in range(10):
        im = np.asarray(open_image_rgb(root / "MAMI/TRAINING" / names[i]), dtype=float)
        red_minus_blue = im[..., 0].mean() - im[..., 2].mean()
        assert (red_minus_blue > 0) == bool(f["warm"][i])
    assert len(df.splits["train"]) + len(df.splits["dev"]) == 99


def test_documented_ceilings_match_the_latent_factors():
    got = ceilings(seed=11, n=60_000)
    for key, value in EXPECTED_CEILINGS.items():
        assert got[key] == pytest.approx(value, abs=0.012), key
        assert f"{value:.3f}" in synthetic.__doc__  # the docstring states the same numbers
    # fusing image and text is worth something: the pair rule beats either modality alone
    assert got["Task_A"] > got["Task_A_image_only"] + 0.1 > got["Task_A_text_only"] + 0.1


def test_label_structure_is_mami_like():
    f = sample_mami(np.random.default_rng(0), 20_000, n_inconsistent=200)
    ok = ~f["inconsistent"]
    assert f["inconsistent"].sum() == 200
    assert abs(f["misogynous"].mean() - 0.5) < 0.02
    for lab in SUB_LABELS:
        assert (f[lab][ok] <= f["misogynous"][ok]).all()  # sub-labels only on misogynous memes
        assert not (f[f"latent_{lab}"] & ~f["latent_misogynous"]).any()
    prev = {lab: f[lab][f["misogynous"] == 1].mean() for lab in SUB_LABELS}
    assert prev["stereotype"] > prev["objectification"] > prev["shaming"] > 0.15
    assert prev["violence"] < prev["shaming"]
    both = (f["stereotype"] & f["objectification"]).mean()
    assert both > 0.05  # labels overlap
    # shaming is text-only: its phrase occurs on no other meme; objectification image-only likewise
    assert (f["cue_shaming"] == f["latent_shaming"]).all()
    assert (f["cue_objectification"] == f["latent_objectification"]).all()
    # stereotype needs the pair: its phrase also appears on benign confounders
    assert (f["cue_stereotype"] & ~f["latent_misogynous"]).sum() > 500


def test_confounders_reuse_captions_with_the_opposite_label(small_set):
    root, _ = small_set
    rows = [line.split("\t") for line in (root / "MAMI/TRAINING/training.csv").read_text().splitlines()[1:]]
    labels_by_caption = {}
    for r in rows:
        labels_by_caption.setdefault(r[6], set()).add(r[1])
    assert any(v == {"0", "1"} for v in labels_by_caption.values())
    fb = sample_fbhm(np.random.default_rng(0), 5000)
    copies = fb["copy_of"] >= 0
    assert copies.sum() > 300
    assert not fb["latent_hateful"][copies].any() and fb["latent_hateful"][fb["copy_of"][copies]].all()
    assert not fb["warm"][copies].any() and fb["warm"][fb["copy_of"][copies]].all()


def test_refuses_to_overwrite_real_data(tmp_path):
    (tmp_path / "MAMI").mkdir()
    (tmp_path / "MAMI" / "keep.txt").write_text("mine")
    with pytest.raises(MamikitError, match="refusing"):
        generate(tmp_path, n_mami=2, n_mami_test=0, n_fbhm=0, progress=False)
    assert (tmp_path / "MAMI" / "keep.txt").exists()


def test_regenerating_replaces_a_previous_synthetic_set(tmp_path):
    generate(tmp_path, seed=1, n_mami=10, n_mami_test=0, n_fbhm=0, progress=False)
    generate(tmp_path, seed=1, n_mami=5, n_mami_test=0, n_fbhm=0, progress=False)
    assert len(list((tmp_path / "MAMI" / "TRAINING").glob("*.jpg"))) == 5
    assert not (tmp_path / "FBHM").exists()


def test_synth_cli_prints_counts(tmp_path, capsys):
    assert main(["synth", "--out", str(tmp_path / "d"), "--seed", "3", "--mami", "12", "--mami-test", "4",
                 "--fbhm", "6"]) == 0
    out = capsys.readouterr().out
    assert "MAMI: training 12" in out and "FBHM: train 5, dev_seen 1" in out
    assert (tmp_path / "d" / "MAMI" / "test_labels.txt").read_text().count("\n") == 4


# ------------------------------------------------------------------ ensure: keep a whole set, repair an unfinished one

TINY = {"n_mami": 30, "n_mami_test": 10, "n_fbhm": 18}


def test_ensure_repairs_a_truncated_set_which_then_loads(tmp_path):
    root = tmp_path / "data"
    generate(root, seed=4, progress=False, **TINY)
    for image in sorted((root / "MAMI" / "TRAINING").glob("*.jpg"))[:3]:
        image.unlink()
    assert synthetic.incomplete(root, seed=4, **TINY).startswith("3 images of MAMI/TRAINING/training.csv are missing")
    (root / "FBHM" / "dev_seen.jsonl").unlink()
    reason = synthetic.incomplete(root, seed=4, **TINY)
    assert reason is not None and "missing" in reason
    info = synthetic.ensure(root, seed=4, progress=False, **TINY)
    assert info["action"] == "regenerated" and info["reason"] == reason
    assert synthetic.incomplete(root, seed=4, **TINY) is None
    fresh = tmp_path / "fresh"
    generate(fresh, seed=4, progress=False, **TINY)
    assert _files(root) == _files(fresh)  # the repaired set is the set the seed gives
    data = load_datasets(root)
    assert all(not ds.problems for ds in data.values())
    assert sum(data["MAMI"].counts().values()) == 30 - 30 // 100 + 10
    assert sum(data["FBHM"].counts().values()) == 18


def test_ensure_keeps_a_whole_set_and_rewrites_one_of_other_settings(tmp_path):
    root = tmp_path / "data"
    first = synthetic.ensure(root, seed=4, progress=False, **TINY)
    assert first["action"] == "generated" and first["reason"] == ""
    stamp = {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}
    kept = synthetic.ensure(root, seed=4, progress=False, **TINY)
    assert kept["action"] == "kept" and kept["counts"] == first["counts"] and kept["paths"] == first["paths"]
    assert kept["ceilings"] == pytest.approx(first["ceilings"])
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()} == stamp  # nothing rewritten
    other = synthetic.ensure(root, seed=5, progress=False, **TINY)
    assert other["action"] == "regenerated" and "seed 4" in other["reason"]
    smaller = synthetic.ensure(root, seed=5, progress=False, **dict(TINY, n_fbhm=12))
    assert smaller["action"] == "regenerated" and len((root / "FBHM" / "train.jsonl").read_text().splitlines()) == 10


def test_ensure_finishes_a_set_whose_writer_was_killed(tmp_path, monkeypatch):
    root = tmp_path / "data"

    real = synthetic._write_images

    def killed_at_the_test_images(folder, names, *args):
        if folder.name == "test":
            raise KeyboardInterrupt  # the writer stops after the MAMI training set
        real(folder, names, *args)

    monkeypatch.setattr(synthetic, "_write_images", killed_at_the_test_images)
    with pytest.raises(KeyboardInterrupt):
        generate(root, seed=4, progress=False, **TINY)
    monkeypatch.undo()
    assert (root / "MAMI" / "TRAINING" / "training.csv").exists()  # what notebook 01 used to take for a whole set
    with pytest.raises(MamikitError):
        load_datasets(root)
    info = synthetic.ensure(root, seed=4, progress=False, **TINY)
    assert info["action"] == "regenerated" and info["reason"] == "the writer stopped before the end"
    assert load_datasets(root)["MAMI"].counts()["test"] == 10


def test_ensure_never_touches_real_data(tmp_path):
    (tmp_path / "MAMI").mkdir()
    (tmp_path / "MAMI" / "keep.txt").write_text("mine")
    with pytest.raises(MamikitError, match="refusing"):
        synthetic.ensure(tmp_path, progress=False, **TINY)
    assert (tmp_path / "MAMI" / "keep.txt").read_text() == "mine"


def test_text_only_set_is_learnable_from_its_text_and_reads_back(tmp_path):
    """HSText in the splits layout: a rule on the words alone (a hostile phrase, whoever the subject) scores near
    the set's ceiling, while the subject alone (the confounders name the same targets) does not."""
    from mamikit.metrics import score_a
    from mamikit.synthetic import GROUPS, HOSTILE, SHAMING, STEREOTYPE, VIOLENCE, WOMEN, generate_single

    info = generate_single(tmp_path, seed=4, n=400)
    assert info["counts"] == {"train": 280, "dev": 60, "test": 60} and info["ceiling"] > 0.9
    ds = load_datasets(tmp_path, ["HSText"])["HSText"]
    assert ds.problems == [] and ds.counts() == info["counts"]
    df = ds.splits["train"]
    assert df["image"].isna().all()
    said = df["text"].map(lambda t: int(any(p in t for p in HOSTILE + SHAMING + STEREOTYPE + VIOLENCE)))
    who = df["text"].map(lambda t: int(any(s in t for s in GROUPS + WOMEN)))
    assert score_a(df["hateful"].to_numpy(), said.to_numpy()) > 0.88
    assert score_a(df["hateful"].to_numpy(), who.to_numpy()) < 0.8
    again = generate_single(tmp_path / "again", seed=4, n=400, fmt="csv")
    csv_ds = load_datasets(tmp_path / "again", ["HSText"])["HSText"]
    assert csv_ds.splits["train"].equals(df)  # the same rows from the CSV layout
    assert again["paths"]["train"].endswith("train.csv")
    (tmp_path / "HSText" / ".mamikit-synthetic.json").unlink()  # no longer marked as generated: never overwritten
    with pytest.raises(MamikitError, match="refusing to overwrite"):
        generate_single(tmp_path, seed=4, n=400)


def test_image_only_set_reads_back_with_its_images(tmp_path, monkeypatch):
    import json

    from mamikit.registry import TASKS_PATH
    from mamikit.synthetic import generate_single

    cfg = json.loads(TASKS_PATH.read_text())
    cfg["datasets"]["Tone"] = {"labels": ["warm"], "tasks": {"Warm": ["warm"]}, "modalities": ["image"],
                               "layout": "splits", "multi_task": False}
    (tmp_path / "tasks.json").write_text(json.dumps(cfg))
    monkeypatch.setenv("MAMIKIT_TASKS", str(tmp_path / "tasks.json"))
    generate_single(tmp_path / "data", "Tone", seed=2, n=20)
    ds = load_datasets(tmp_path / "data", ["Tone"])["Tone"]
    assert ds.problems == [] and sum(ds.counts().values()) == 20
    assert ds.splits["train"]["image"].map(lambda p: p.endswith(".png")).all()
    assert (ds.splits["train"]["text"] == "").all()
