"""The submission zips: one per official sub-task, chosen by dev score, accepted by the official scorer."""

import json
import zipfile

import numpy as np
import pytest

from mamikit.metrics import read_answer, score_files
from mamikit.evaluation import write_answers
from mamikit.submission import make_submission, score_submission
from mamikit.utils import MamikitError

N = 40


def _gold(rng) -> np.ndarray:
    """(N, 5) gold labels: misogynous, then sub-labels only on misogynous memes."""
    mis = rng.random(N) < 0.5
    subs = (rng.random((N, 4)) < 0.5) & mis[:, None]
    return np.column_stack([mis, subs]).astype(int)


def _write_run(root, name, scores: dict, gold, right: dict, rng, answers: bool = True):
    """A run folder: log rows with the given max scores, and best answers right on `right[task]` of the memes."""
    run = root / "round1" / name
    run.mkdir(parents=True)
    experiment, seed = name.split("-seed")
    rows = [{"kind": "loss", "experiment": experiment, "seed": int(seed), "epoch": 0, "step": 5, "lr": 1e-3,
             "batches": 1, "terms": {"loss": 0.7}}]
    for step, lower in ((10, 0.1), (20, 0.0)):  # the max is each (split, task)'s value at step 20
        for (split, task), value in scores.items():
            rows.append({"experiment": experiment, "seed": int(seed), "epoch": 0, "step": step, "split": split,
                         "task": task, "label": None, "metric": "score", "value": value - lower})
    (run / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if answers:
        ids = [f"{k}.jpg" for k in range(N)]
        probs = {}
        for task, cols in (("Task_A", slice(0, 1)), ("Task_B", slice(1, 5))):
            flip = rng.random((N, cols.stop - cols.start)) >= right[task]  # wrong on the other memes
            probs[task] = (ids, np.where(flip, 1 - gold[:, cols], gold[:, cols]).astype(float))
        write_answers(run, "best", probs)
    return run


@pytest.fixture()
def runs(tmp_path):
    """Two runs whose dev and test scores disagree: dev prefers 02 on Task A and 10 on Task B."""
    rng = np.random.default_rng(0)
    gold = _gold(rng)
    truth = tmp_path / "test_labels.txt"
    truth.write_text("".join(f"{k}.jpg\t" + "\t".join(map(str, row)) + "\n" for k, row in enumerate(gold)))
    root = tmp_path / "runs"
    _write_run(root, "02-seed0",
               {("dev", "Task_A"): 0.80, ("test", "Task_A"): 0.50, ("dev", "Task_B"): 0.40, ("test", "Task_B"): 0.90},
               gold, {"Task_A": 0.55, "Task_B": 0.95}, rng)
    _write_run(root, "10-seed0",
               {("dev", "Task_A"): 0.60, ("test", "Task_A"): 0.90, ("dev", "Task_B"): 0.70, ("test", "Task_B"): 0.30},
               gold, {"Task_A": 0.95, "Task_B": 0.55}, rng)
    return root, truth


def test_each_subtask_gets_the_run_with_the_best_dev_score_not_test(runs, tmp_path):
    root, truth = runs
    picks = make_submission(root, tmp_path / "out", truth=truth)
    assert (picks["A"].run, picks["B"].run) == ("round1/02-seed0", "round1/10-seed0")
    assert picks["A"].dev_score == pytest.approx(0.80) and picks["B"].dev_score == pytest.approx(0.70)
    # the other run's answers score better on test: the test split did not choose
    other_a = score_files(truth, root / "round1" / "10-seed0" / "answer" / "best" / "taskA" / "answer.txt")["taska"]
    other_b = score_files(truth, root / "round1" / "02-seed0" / "answer" / "best" / "taskB" / "answer.txt")["taskb"]
    assert picks["A"].test_score < other_a and picks["B"].test_score < other_b
    saved = json.loads((tmp_path / "out" / "submission.json").read_text())
    assert saved["A"]["run"] == "round1/02-seed0" and saved["B"]["zip_path"] == picks["B"].zip_path


def test_the_zips_are_what_the_competition_took_and_the_official_scorer_accepts(runs, tmp_path):
    root, truth = runs
    picks = make_submission(root, tmp_path / "out", truth=truth)
    for subtask, columns, key in (("A", 1, "taska"), ("B", 5, "taskb")):
        path = tmp_path / "out" / f"task{subtask}.zip"
        assert picks[subtask].zip_path == str(path)
        with zipfile.ZipFile(path) as zf:
            assert zf.namelist() == ["answer.txt"]
            (tmp_path / subtask).mkdir()
            zf.extractall(tmp_path / subtask)
        ids, values = read_answer(tmp_path / subtask / "answer.txt")
        assert values.shape == (N, columns) and len(ids) == N
        run_answer = root / picks[subtask].run / "answer" / "best" / f"task{subtask}" / "answer.txt"
        assert (tmp_path / subtask / "answer.txt").read_bytes() == run_answer.read_bytes()
        scores = score_files(truth, tmp_path / subtask / "answer.txt")
        assert score_submission(truth, path) == scores
        assert picks[subtask].test_score == scores[key]


def test_the_test_split_may_not_choose(runs, tmp_path):
    root, _ = runs
    with pytest.raises(MamikitError, match="chosen by the dev split"):
        make_submission(root, tmp_path / "out", select="test")
    assert not (tmp_path / "out").exists()


def test_a_run_without_answer_files_is_passed_over(runs, tmp_path):
    root, truth = runs
    gold = np.zeros((N, 5), int)
    _write_run(root, "30-seed0", {("dev", "Task_A"): 0.99, ("dev", "Task_B"): 0.99}, gold, {}, None, answers=False)
    picks = make_submission(root, tmp_path / "out")
    assert (picks["A"].run, picks["B"].run) == ("round1/02-seed0", "round1/10-seed0")
    assert picks["A"].test_score is None


def test_a_zip_with_more_than_the_answer_is_refused(runs, tmp_path):
    root, truth = runs
    path = tmp_path / "bad.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("answer.txt", "0.jpg\t1\n")
        zf.writestr("notes.txt", "hi")
    with pytest.raises(MamikitError, match="holds only answer.txt"):
        score_submission(truth, path)
    with pytest.raises(MamikitError, match="no runs|no run logs"):
        make_submission(tmp_path / "runs" / "round1" / "02-seed0" / "answer", tmp_path / "x")
