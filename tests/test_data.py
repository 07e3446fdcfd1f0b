"""Readers, cleaning, problem reports and stratified splits (mamikit.data)."""

import io
import json
import math
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from mamikit.cli import main
from mamikit.data import Task, authors_split, check, dataset_labels, load_datasets, load_tasks, stratified_split
from mamikit.utils import MamikitError

HEADER = "file_name\tmisogynous\tshaming\tstereotype\tobjectification\tviolence\tText Transcription"


def _png_bytes(im):
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def _odd_images(folder):
    """Valid but odd images -> {file name: bytes written}."""
    folder.mkdir(parents=True, exist_ok=True)
    Image.new("L", (50, 40), 128).save(folder / "gray.jpg")
    Image.new("CMYK", (60, 30), (10, 200, 30, 0)).save(folder / "cmyk.jpg")
    Image.new("RGBA", (32, 32), (255, 0, 0, 90)).save(folder / "rgba.png")
    (folder / "png_named.jpg").write_bytes(_png_bytes(Image.new("RGB", (20, 20), (0, 0, 255))))
    Image.new("P", (16, 16), 3).save(folder / "anim.gif")
    Image.new("RGB", (1, 1), (9, 9, 9)).save(folder / "tiny.jpg")
    Image.new("L", (5000, 5000), 200).save(folder / "huge.png")
    for i in range(12):
        Image.new("RGB", (24, 24), (i * 20, 50, 50)).save(folder / f"{i}.jpg")
    (folder / "garbage.jpg").write_bytes(b"this is not an image")
    return folder


def _mami_training(root, lines, header=HEADER, eol="\n", bom=False):
    folder = _odd_images(root / "MAMI" / "TRAINING")
    text = eol.join([header, *lines]) + eol
    data = text.encode("utf-8")
    (folder / "training.csv").write_bytes((b"\xef\xbb\xbf" if bom else b"") + data)
    return folder


GOOD_ROWS = [
    "gray.jpg\t1\t1\t0\t0\t0\tgrayscale meme",
    "cmyk.jpg\t0\t0\t0\t0\t0\tcmyk 🎉 emoji 🙂",
    "rgba.png\t1\t0\t1\t1\t0\t",
    "png_named.jpg\t1\t0\t0\t0\t1\t" + "very long text " * 700,
    "anim.gif\t0\t0\t0\t0\t0\tgif",
    "tiny.jpg\t1\t0\t1\t0\t0\ttiny",
    "huge.png\t0\t0\t0\t0\t0\thuge",
    "0.jpg\t1\t1\t1\t1\t1\ta \"quoted\" word, and a comma",
    "1.jpg\t0\t0\t0\t0\t0\ttext with\ta tab inside",
    "garbage.jpg\t0\t0\t0\t0\t0\tundecodable image, found by check only",
]


def test_tasks_of_table_1():
    tasks = load_tasks()
    assert [t.name for t in tasks["MAMI"]] == ["MAMI", "Task_A", "Task_B"]
    assert tasks["FBHM"] == (Task("Hateful", "FBHM", ("hateful",)),)
    assert (dict((t.name, t.labels) for t in tasks["MAMI"])["Task_B"]
            == ("shaming", "stereotype", "objectification", "violence"))
    assert dataset_labels("MAMI") == ("misogynous", "shaming", "stereotype", "objectification", "violence")
    assert dataset_labels("MAMI", tasks) == dataset_labels("MAMI")
    with pytest.raises(MamikitError):
        dataset_labels("NOPE")


@pytest.mark.parametrize("eol, bom", [("\n", False), ("\r\n", True)])
def test_mami_reader_loads_odd_but_valid_inputs(tmp_path, eol, bom):
    _mami_training(tmp_path, GOOD_ROWS, eol=eol, bom=bom)
    ds = load_datasets(tmp_path)["MAMI"]
    assert ds.problems == []
    rows = {r["id"]: r for df in (ds.splits["train"], ds.splits["dev"]) for r in df.to_dict("records")}
    assert len(rows) == len(GOOD_ROWS)
    assert rows["cmyk.jpg"]["text"] == "cmyk 🎉 emoji 🙂"
    assert rows["rgba.png"]["text"] == ""
    assert rows["png_named.jpg"]["text"].startswith("very long text") and rows["png_named.jpg"]["violence"] == 1
    assert rows["1.jpg"]["text"] == "text with\ta tab inside"
    assert rows["0.jpg"]["text"] == 'a "quoted" word, and a comma'
    assert rows["gray.jpg"]["image"] == str((tmp_path / "MAMI/TRAINING/gray.jpg").resolve())
    # check decodes every image: only the garbage file is a problem
    checked = check(tmp_path, progress=False)["MAMI"]
    assert [(p.file, "unreadable image" in p.reason) for p in checked.problems] == [("garbage.jpg", True)]


def test_mami_bad_rows_are_reported_one_line_each(tmp_path):
    bad = [
        "2.jpg\t1\tx\t0\t0\t0\tunreadable label",
        "gray.jpg\t1\t0\t0\t0\t0\tduplicate of the first row",
        "missing.jpg\t1\t0\t0\t0\t0\tno such image",
        "../escape.jpg\t1\t0\t0\t0\t0\tescapes",
        "/etc/hostname\t1\t0\t0\t0\t0\tabsolute",
        "3.jpg\t1\t0\t0\t0\tshort row",
    ]
    _mami_training(tmp_path, GOOD_ROWS[:2] + bad + ["4.jpg\t0\t1\t0\t0\t0\tinconsistent"])
    csv_path = tmp_path / "MAMI/TRAINING/training.csv"
    csv_path.write_bytes(csv_path.read_bytes() + b"5.jpg\t0\t0\t0\t0\t0\tlatin-1 caf\xe9\n")
    ds = load_datasets(tmp_path)["MAMI"]
    got = {(p.file, p.line) for p in ds.problems}
    assert got == {("2.jpg", 4), ("gray.jpg", 5), ("missing.jpg", 6), ("../escape.jpg", 7), ("/etc/hostname", 8),
                   ("3.jpg", 9), ("5.jpg", 11)}
    reasons = {p.file: p.reason for p in ds.problems}
    assert "unreadable label shaming='x'" in reasons["2.jpg"]
    assert "duplicate file name (first on line 2)" in reasons["gray.jpg"]
    assert "image not found" in reasons["missing.jpg"]
    assert "escapes" in reasons["../escape.jpg"] and "absolute" in reasons["/etc/hostname"]
    assert "UTF-8" in reasons["5.jpg"]
    assert all("training.csv line" in p.reason for p in ds.problems)
    assert str(ds.problems[0]).startswith("MAMI 2.jpg unreadable label")
    assert ds.dropped_inconsistent == 1
    kept = set(ds.splits["train"]["id"]) | set(ds.splits["dev"]["id"])
    assert kept == {"gray.jpg", "cmyk.jpg"}


def test_mami_header_variations(tmp_path):
    header = " Text Transcription \tviolence\tfile_name \tmisogynous\tshaming\tstereotype\tobjectification"
    _mami_training(tmp_path, ["hello\t0\tgray.jpg\t1\t0\t1\t0", "\t0\tcmyk.jpg\t0\t0\t0\t0"], header=header)
    df = load_datasets(tmp_path)["MAMI"].splits
    rows = {r["id"]: r for d in (df["train"], df["dev"]) for r in d.to_dict("records")}
    assert rows["gray.jpg"]["text"] == "hello" and rows["gray.jpg"]["stereotype"] == 1
    assert rows["cmyk.jpg"]["text"] == ""


def test_mami_comma_separated_file_is_detected(tmp_path):
    _mami_training(tmp_path, ['gray.jpg,1,0,1,0,0,"hello, world"', "cmyk.jpg,0,0,0,0,0,plain"],
                   header=HEADER.replace("\t", ","))
    df = load_datasets(tmp_path)["MAMI"].splits
    rows = {r["id"]: r for d in (df["train"], df["dev"]) for r in d.to_dict("records")}
    assert rows["gray.jpg"]["text"] == "hello, world" and rows["gray.jpg"]["stereotype"] == 1


def test_mami_test_set_joins_gold_labels(tmp_path):
    _mami_training(tmp_path, GOOD_ROWS[:3])
    test = _odd_images(tmp_path / "MAMI" / "test")
    (test / "Test.csv").write_text("file_name\tText Transcription\n5.jpg\tfive\n6.jpg\tsix\n")
    (tmp_path / "MAMI" / "test_labels.txt").write_text("5.jpg\t1\t0\t1\t0\t0\n7.jpg\t0\t0\t0\t0\t0\n")
    ds = load_datasets(tmp_path)["MAMI"]
    t = ds.splits["test"].set_index("id")
    assert list(t.index) == ["5.jpg", "6.jpg"]
    assert t.loc["5.jpg", "stereotype"] == 1 and t.loc["6.jpg", "misogynous"] == -1
    assert [p.file for p in ds.problems] == ["7.jpg"]
    assert any("no gold labels" in n for n in ds.notes)


def _fbhm(root, files):
    folder = root / "FBHM"
    (folder / "img").mkdir(parents=True)
    for i in range(1, 30):
        Image.new("RGB", (16, 16), (i, 0, 0)).save(folder / "img" / f"{i:05d}.png")
    for stem, rows in files.items():
        text = "\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n"
        (folder / f"{stem}.jsonl").write_text(text, encoding="utf-8")
    return folder


def _row(i, label=None, **extra):
    row = {"id": i, "img": f"img/{i:05d}.png", "text": f"meme {i}"}
    if label is not None:
        row["label"] = label
    return {**row, **extra}


def test_fbhm_reader_splits_and_held_out_test(tmp_path):
    train = [_row(i, i % 2) for i in range(1, 21)]
    train += ["{not json", _row(21, "maybe"), {**_row(22, 1), "img": "../../etc/passwd"}, _row(1, 0), _row(23)]
    _fbhm(tmp_path, {
        "train": train,
        "dev_seen": [_row(24, 1), _row(25, 0)],
        "dev_unseen": [_row(24, 1), _row(26, 0)],
        "test_seen": [_row(27, 1), _row(5, 1)],
        "test_unseen": [_row(28), _row(29)],
    })
    ds = load_datasets(tmp_path)["FBHM"]
    s = ds.splits
    assert len(s["train"]) + len(s["dev"]) == 20 and len(s["dev"]) == 4
    assert list(s["test"]["id"]) == ["24", "25", "26", "27"]
    assert set(s["train"]["id"]).isdisjoint(s["dev"]["id"])
    reasons = {(p.file, p.line): p.reason for p in ds.problems}
    assert "not valid JSON" in reasons[("?", 21)]
    assert "unreadable label" in reasons[("21", 22)]
    assert "escapes" in reasons[("22", 23)]
    assert "duplicate id" in reasons[("1", 24)]
    assert "missing label" in reasons[("23", 25)]
    assert "also in train.jsonl" in reasons[("5", 2)]
    assert any("2 unlabelled" in n for n in ds.notes)
    assert s["test"]["hateful"].tolist() == [1, 0, 0, 1]


def test_new_dataset_from_tasks_file_without_code(tmp_path):
    cfg = {"datasets": {"Sexism": {"labels": ["sexist", "hostile"],
                                   "tasks": {"Sexist": ["sexist"], "Both": ["hostile", "sexist"]}}}}
    (tmp_path / "tasks.json").write_text(json.dumps(cfg))
    folder = tmp_path / "data" / "Sexism"
    (folder / "img").mkdir(parents=True)
    rows = []
    for i in range(10):
        Image.new("RGB", (8, 8)).save(folder / "img" / f"{i}.png")
        rows.append(json.dumps({"id": f"s{i}", "img": f"img/{i}.png", "text": "t", "sexist": i % 2,
                                "hostile": i % 3 == 0}))
    (folder / "train.jsonl").write_text("\n".join(rows))
    tasks = load_tasks(tmp_path / "tasks.json")
    assert tasks["Sexism"][1] == Task("Both", "Sexism", ("sexist", "hostile"))
    ds = load_datasets(tmp_path / "data", tasks_path=tmp_path / "tasks.json")["Sexism"]
    assert ds.problems == [] and len(ds.splits["train"]) + len(ds.splits["dev"]) == 10


def test_check_cli_exit_codes(tmp_path, capsys):
    _mami_training(tmp_path, GOOD_ROWS[:2] + ["missing.jpg\t1\t0\t0\t0\t0\tgone"])
    assert main(["check", "--data", str(tmp_path)]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("MAMI missing.jpg image not found")
    assert out[-1] == "1 problems"
    clean = tmp_path / "clean"
    _mami_training(clean, GOOD_ROWS[:2])
    assert main(["check", "--data", str(clean)]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "clean"
    assert main(["check", "--data", str(tmp_path / "nowhere")]) == 2


def _combos(rng, n):
    """MAMI-like label combinations: a few common ones and some rare ones."""
    common = [(0, 0, 0, 0, 0), (1, 0, 1, 0, 0), (1, 0, 0, 1, 0), (1, 1, 1, 1, 0), (1, 0, 1, 1, 1)]
    out = [common[i] for i in rng.choice(len(common), n, p=[0.5, 0.2, 0.15, 0.1, 0.05])]
    out[:3] = [(1, 1, 0, 0, 1), (1, 0, 0, 0, 1), (1, 1, 0, 1, 1)]  # singletons: too rare to stratify
    return out


def test_split_is_stratified_disjoint_complete_and_seeded():
    rng = np.random.default_rng(0)
    n = 2000
    ids = [f"{i}.jpg" for i in range(n)]
    combos = _combos(rng, n)
    train, dev = stratified_split(ids, combos, 0.2, seed=3)
    assert set(train).isdisjoint(dev) and set(train) | set(dev) == set(ids)
    assert len(dev) == math.ceil(0.2 * n)
    by_id = dict(zip(ids, combos))
    full, in_dev = Counter(combos), Counter(by_id[i] for i in dev)
    for combo, count in full.items():
        if count >= 50:
            assert in_dev[combo] / count == pytest.approx(0.2, abs=0.02)
    assert stratified_split(ids, combos, 0.2, seed=3) == (train, dev)
    assert stratified_split(ids, combos, 0.2, seed=4) != (train, dev)
    # independent of the order of the input rows
    perm = rng.permutation(n)
    assert stratified_split([ids[i] for i in perm], [combos[i] for i in perm], 0.2, seed=3) == (train, dev)


def test_split_handles_tiny_and_degenerate_inputs():
    assert stratified_split(["a"], [(1,)], 0.2, 0) == (["a"], [])
    train, dev = stratified_split(list("abcde"), [(0,), (1,), (2,), (3,), (4,)], 0.2, 0)
    assert len(dev) == 1 and len(train) == 4
    train, dev = stratified_split(list("abcdefghij"), [(0,)] * 10, 0.2, 0)
    assert len(dev) == 2


def test_load_datasets_split_seed_changes_split_only(tmp_path):
    _mami_training(tmp_path, [f"{i}.jpg\t{i % 2}\t0\t{i % 2}\t0\t0\tm{i}" for i in range(12)])
    a = load_datasets(tmp_path, split_seed=0)["MAMI"].splits
    b = load_datasets(tmp_path, split_seed=0)["MAMI"].splits
    c = load_datasets(tmp_path, split_seed=1)["MAMI"].splits
    assert a["dev"].equals(b["dev"])
    assert set(a["dev"]["id"]) != set(c["dev"]["id"]) or set(a["train"]["id"]) != set(c["train"]["id"])
    assert list(a["train"].columns) == ["id", "image", "text", "misogynous", "shaming", "stereotype",
                                        "objectification", "violence"]
    assert len(a["test"]) == 0 and list(a["test"].columns) == list(a["train"].columns)


def test_missing_folders_are_errors(tmp_path):
    with pytest.raises(MamikitError, match="no dataset folder"):
        load_datasets(tmp_path)
    with pytest.raises(MamikitError, match="no FBHM"):
        load_datasets(tmp_path, datasets=["FBHM"])


# ------------------------------------------------------------------ the authors' split (row 13 of docs/fidelity.md)


def test_authors_split_is_their_train_test_split_call_in_file_order():
    import pandas as pd
    from sklearn.model_selection import train_test_split

    rng = np.random.default_rng(1)
    n = 500
    common = [(0, 0, 0, 0, 0), (1, 0, 1, 0, 0), (1, 0, 0, 1, 0), (1, 1, 1, 1, 0)]
    combos = [common[i] for i in rng.choice(len(common), n, p=[0.5, 0.25, 0.15, 0.1])]
    labels = ["misogynous", "shaming", "stereotype", "objectification", "violence"]
    df = pd.DataFrame(combos, columns=labels)
    df.insert(0, "file_name", [f"{i}.jpg" for i in range(n)])
    # The authors' call (mamipy/data.py, prepare) on the file's rows.
    train_frac = 0.8
    train_df, eval_df = train_test_split(df, test_size=1 - train_frac, train_size=train_frac, random_state=3704,
                                         stratify=df[labels])
    train, dev = authors_split(df["file_name"].tolist(), combos)
    assert train == train_df["file_name"].tolist() and dev == eval_df["file_name"].tolist()
    assert (len(train), len(dev)) == (400, 100)
    # test_size=0.2 would ask for 4 + 12 rows
    assert len(authors_split([str(i) for i in range(15)], [(i % 2,) for i in range(15)])[1]) == 3
    # The file order is part of it: the same rows in another order split otherwise.
    perm = rng.permutation(n)
    shuffled = authors_split([f"{i}.jpg" for i in perm], [combos[i] for i in perm])
    assert set(shuffled[1]) != set(dev)
    assert set(stratified_split(df["file_name"], combos, 0.2, 0)[1]) != set(dev)


def test_authors_split_merges_a_combination_too_rare_for_their_call():
    rng = np.random.default_rng(2)
    combos = _combos(rng, 200)  # three singletons: scikit-learn alone refuses to stratify
    ids = [f"{i}.jpg" for i in range(200)]
    train, dev = authors_split(ids, combos)
    assert set(train).isdisjoint(dev) and set(train) | set(dev) == set(ids) and len(dev) == 40


def test_load_datasets_authors_split_reads_the_same_pool(tmp_path):
    lines = [f"{i}.jpg\t{i % 2}\t0\t{i % 2}\t0\t0\tm{i}" for i in range(12)]
    _mami_training(tmp_path, lines)
    ours = load_datasets(tmp_path)["MAMI"].splits
    theirs = load_datasets(tmp_path, authors_split=True)["MAMI"].splits
    pool = set(ours["train"]["id"]) | set(ours["dev"]["id"])
    assert set(theirs["train"]["id"]) | set(theirs["dev"]["id"]) == pool and len(theirs["dev"]) == 3
    file_order = [f"{i}.jpg" for i in range(12)]
    expected = authors_split(file_order, [(i % 2, 0, i % 2, 0, 0) for i in range(12)])
    assert sorted(theirs["dev"]["id"]) == sorted(expected[1])
    assert load_datasets(tmp_path, split_seed=5, authors_split=True)["MAMI"].splits["dev"].equals(theirs["dev"])


def test_run_under_the_authors_split_finds_features_across_the_stores_files(tiny_data, tiny_store, caplog):
    from mamikit.batching import make_batch
    from mamikit.experiments import get_experiment
    from mamikit.runs import prepare_data
    from mamikit.store import FeatureStore

    store = FeatureStore(tiny_store)
    ours = prepare_data(get_experiment("10"), tiny_data, store)
    theirs = prepare_data(get_experiment("10", recipe="authors"), tiny_data, store)
    pool = set(ours[("MAMI", "train")].ids) | set(ours[("MAMI", "dev")].ids)
    assert set(theirs[("MAMI", "train")].ids) | set(theirs[("MAMI", "dev")].ids) == pool
    assert set(theirs[("MAMI", "dev")].ids) != set(ours[("MAMI", "dev")].ids)
    assert theirs[("MAMI", "test")].ids == ours[("MAMI", "test")].ids
    # The same meme gives the same batch whichever file of the store holds it.
    where = {m: (key, i) for key in (("MAMI", "train"), ("MAMI", "dev")) for i, m in enumerate(ours[key].ids)}
    index = np.arange(len(theirs[("MAMI", "dev")]))[:6]
    a = make_batch(theirs[("MAMI", "dev")], index)
    for row, meme in enumerate(a.ids):
        key, i = where[meme]
        b = make_batch(ours[key], np.array([i]))
        n = int(b.text_mask.sum())
        assert torch.equal(a.clip[row], b.clip[0]) and torch.equal(a.text_ids[row, :n], b.text_ids[0, :n])
        assert torch.equal(a.text_hidden[row, :n], b.text_hidden[0, :n])
        assert torch.equal(a.detr[row, : b.detr.shape[1]][a.detr_mask[row, : b.detr.shape[1]]],
                           b.detr[0][b.detr_mask[0]])
    # The demo's short texts are the same at 120 and 121 tokens: nothing to warn about.
    assert "cut the text" not in caplog.text


def test_text_length_note_counts_the_memes_a_different_length_touches(tiny_data, tiny_store):
    from mamikit.batching import text_length_note
    from mamikit.experiments import get_experiment
    from mamikit.runs import prepare_data
    from mamikit.store import FeatureStore

    data = prepare_data(get_experiment("10"), tiny_data, FeatureStore(tiny_store))
    longest = max(int(np.diff(s.features.text_offsets.numpy()).max()) for s in data.values())
    assert text_length_note(data, 120, None) == "" and text_length_note(data, 120, 120) == ""
    assert text_length_note(data, 120, 121) == ""  # no text fills 120 tokens
    note = text_length_note(data, longest, longest + 1)  # as if the store had cut the longest texts
    filled = sum(int((np.diff(s.features.text_offsets.numpy())[s.rows] >= longest).sum()) for s in data.values())
    assert filled >= 1 and f": {filled} meme(s)" in note
    assert "max_text_tokens" in text_length_note(data, 120, longest - 1)


# ----------------------------------------------------------------------------- the "splits" layout (text-only HSText)


def _hstext(root, fmt: str, rows: dict[str, list[str]]):
    """HSText's split files (`fmt` "jsonl" or "csv", CSV rows after the header `id,text,hateful`)."""
    folder = root / "HSText"
    folder.mkdir(parents=True, exist_ok=True)
    for split, lines in rows.items():
        head = ["id,text,hateful"] if fmt == "csv" else []
        (folder / f"{split}.{fmt}").write_text("\n".join(head + lines) + "\n", encoding="utf-8")
    return folder


def test_text_only_dataset_in_jsonl_and_csv_reads_its_own_dev_and_test(tmp_path):
    def rec(i, label=None, text=None):
        row = {"id": f"h{i}", "text": text or f"text {i}"}
        return json.dumps(row if label is None else dict(row, hateful=label))

    _hstext(tmp_path / "j", "jsonl", {"train": [rec(i, i % 2) for i in range(6)], "dev": [rec(10, 1), rec(11, 0)],
                                      "test": [rec(20, 1), rec(21)]})
    ds = load_datasets(tmp_path / "j", ["HSText"])["HSText"]
    assert ds.problems == [] and ds.counts() == {"train": 6, "dev": 2, "test": 2}
    assert ds.splits["dev"]["id"].tolist() == ["h10", "h11"]  # the dev file, not a split of train
    assert ds.splits["test"]["hateful"].tolist() == [1, -1]  # a test row without its label: unknown
    assert ds.splits["train"]["image"].isna().all() and ds.splits["train"]["text"].iloc[0] == "text 0"

    _hstext(tmp_path / "c", "csv", {"train": [f'c{i},"a, quoted text {i}",{i % 2}' for i in range(10)]})
    ds = load_datasets(tmp_path / "c", ["HSText"])["HSText"]
    assert ds.problems == [] and ds.counts() == {"train": 8, "dev": 2, "test": 0}  # no dev file: 80/20 of train
    assert ds.splits["train"]["text"].str.startswith("a, quoted text").all()
    assert any("no test file" in n for n in ds.notes)


def test_text_only_bad_rows_are_reported_with_file_and_line(tmp_path):
    _hstext(tmp_path, "csv", {"train": ["a,fine,1", "b,fine too,maybe", ",no id,0", "a,again,0", "c,,1", "d,x"],
                              "dev": ["e,ok,0", "a,in train already,1"]})
    ds = load_datasets(tmp_path, ["HSText"])["HSText"]
    got = {(p.file, p.reason) for p in ds.problems}
    assert got == {("b", "unreadable label hateful='maybe' (train.csv line 3)"), ("?", "no id (train.csv line 4)"),
                   ("a", "duplicate id (first in train.csv line 2) (train.csv line 5)"),
                   ("c", "no text (train.csv line 6)"), ("d", "expected 3 columns, found 2 (train.csv line 7)"),
                   ("a", "duplicate id (first in train.csv line 2) (dev.csv line 3)")}
    assert ds.counts() == {"train": 1, "dev": 1, "test": 0}
    (tmp_path / "HSText" / "train.jsonl").write_text("{}\n")
    with pytest.raises(MamikitError, match="both train.jsonl and train.csv"):
        load_datasets(tmp_path, ["HSText"])
    (tmp_path / "HSText" / "train.jsonl").unlink()
    (tmp_path / "HSText" / "test.csv").write_text("key,text,hateful\nx,y,1\n")
    with pytest.raises(MamikitError, match="test.csv: no id column"):
        load_datasets(tmp_path, ["HSText"])


def test_layout_and_modalities_are_checked_in_the_tasks_file(tmp_path):
    from mamikit.registry import dataset_layout, dataset_modalities

    cfg = {"primary": "M", "datasets": {"M": {"labels": ["a"]}, "T": {"labels": ["b"], "modalities": ["text"]},
                                        "V": {"labels": ["c"], "modalities": ["sound"], "layout": "splits"},
                                        "F": {"labels": ["d"]}}}
    path = tmp_path / "tasks.json"
    path.write_text(json.dumps(cfg))
    assert dataset_layout("M", path) == "mami" and dataset_layout("F", path) == "hateful_memes"
    assert dataset_modalities("F", path) == ("image", "text")  # absent: a meme dataset, as old files say
    with pytest.raises(MamikitError, match="holds only text; its layout must be 'splits'"):
        dataset_layout("T", path)
    with pytest.raises(MamikitError, match="dataset V has modalities"):
        dataset_modalities("V", path)
