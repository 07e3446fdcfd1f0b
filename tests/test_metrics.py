"""Official MAMI scores, answer files and the score CLI."""

import numpy as np
import pytest
from sklearn.metrics import f1_score

from mamikit.cli import main
from mamikit.metrics import read_answer, read_truth, score_a, score_b, score_files, write_answer
from mamikit.utils import MamikitError


def _sklearn_b(gold, pred):
    """The official scoreB written the straightforward way with scikit-learn."""
    weights = gold.sum(axis=0)
    per = [f1_score(gold[:, j], pred[:, j], labels=[0, 1], average="macro", zero_division=0)
           for j in range(gold.shape[1])]
    return float(np.dot(per, weights) / weights.sum())


def test_score_a_hand_worked():
    # positive class: tp 1, fp 0, fn 1 -> 2/3; negative class: tp 2, fp 1, fn 0 -> 4/5
    assert score_a([1, 1, 0, 0], [1, 0, 0, 0]) == pytest.approx((2 / 3 + 4 / 5) / 2)
    assert score_a([1, 0, 1, 0], [1, 0, 1, 0]) == 1.0
    assert score_a([1, 0, 1, 0], [0, 1, 0, 1]) == 0.0


def test_score_a_all_negative_predictions():
    # positive F1 is 0; negative: tp 2, fp 2 -> 4/6
    assert score_a([1, 0, 0, 1], [0, 0, 0, 0]) == pytest.approx((0 + 4 / 6) / 2)
    # gold and predictions all negative: the absent class scores 0, as in the official scorer
    assert score_a([0, 0, 0], [0, 0, 0]) == pytest.approx(0.5)


def test_score_a_matches_sklearn_macro_on_random_data():
    rng = np.random.default_rng(0)
    for _ in range(50):
        n = int(rng.integers(1, 40))
        gold, pred = rng.integers(0, 2, n), rng.integers(0, 2, n)
        expected = f1_score(gold, pred, labels=[0, 1], average="macro", zero_division=0)
        assert score_a(gold, pred) == pytest.approx(expected)


def test_score_b_hand_worked_weights():
    gold = np.array([[1, 1], [0, 1], [0, 1], [0, 0]])
    pred = np.array([[1, 1], [1, 0], [0, 1], [0, 0]])
    a0 = score_a(gold[:, 0], pred[:, 0])  # weight 1
    a1 = score_a(gold[:, 1], pred[:, 1])  # weight 3
    assert score_b(gold, pred) == pytest.approx((a0 * 1 + a1 * 3) / 4)
    # not scikit-learn's multilabel weighted F1 (positive class only)
    assert score_b(gold, pred) != pytest.approx(f1_score(gold, pred, average="weighted", zero_division=0))


def test_score_b_label_without_gold_positives_has_no_weight():
    gold = np.array([[1, 0], [0, 0], [1, 0], [0, 0]])
    good = np.array([[1, 0], [0, 0], [1, 0], [0, 0]])
    wrong_second = np.array([[1, 1], [0, 1], [1, 1], [0, 1]])
    assert score_b(gold, good) == 1.0
    assert score_b(gold, wrong_second) == 1.0  # the second label counts for nothing


def test_score_b_all_gold_negative_is_zero():
    gold = np.zeros((5, 4), dtype=int)
    assert score_b(gold, gold) == 0.0
    assert score_b(np.zeros((0, 4), dtype=int), np.zeros((0, 4), dtype=int)) == 0.0


def test_score_b_matches_sklearn_formula_on_random_data():
    rng = np.random.default_rng(1)
    for _ in range(30):
        gold = rng.integers(0, 2, (25, 4))
        gold[0] = 1  # at least one positive per label
        pred = rng.integers(0, 2, (25, 4))
        assert score_b(gold, pred) == pytest.approx(_sklearn_b(gold, pred))


def test_score_rejects_non_binary_values():
    with pytest.raises(MamikitError):
        score_a([0, 2], [0, 1])


def test_write_answer_layouts_and_round_trip(tmp_path):
    ids = ["1.jpg", "2.jpg", "3.jpg"]
    write_answer(tmp_path / "a" / "answer.txt", ids, np.array([1, 0, 1]))
    assert (tmp_path / "a" / "answer.txt").read_text() == "1.jpg\t1\n2.jpg\t0\n3.jpg\t1\n"
    pred = np.array([[1, 0, 1, 1, 0], [0, 0, 0, 0, 0], [1, 1, 0, 0, 1]])
    write_answer(tmp_path / "b.txt", ids, pred)
    got_ids, got = read_answer(tmp_path / "b.txt")
    assert got_ids == ids and (got == pred).all()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b.txt"]  # no temporary files left
    with pytest.raises(MamikitError):
        write_answer(tmp_path / "c.txt", ids, np.zeros((3, 3), dtype=int))


def _random_files(tmp_path, rng, n=40, six=True):
    ids = [f"{i}.jpg" for i in rng.permutation(1000)[:n]]
    mis = rng.integers(0, 2, n)
    sub = rng.integers(0, 2, (n, 4)) * mis[:, None]
    gold = np.column_stack([mis, sub])
    pred = rng.integers(0, 2, (n, 5))
    write_answer(tmp_path / "truth.txt", ids, gold)
    order = rng.permutation(n)  # answers may come in any order
    write_answer(tmp_path / "answer.txt", [ids[i] for i in order], (pred if six else pred[:, 0])[order])
    return gold, pred


def test_score_cli_agrees_with_formula(tmp_path, capsys):
    rng = np.random.default_rng(2)
    for six in (True, False):
        gold, pred = _random_files(tmp_path, rng, six=six)
        assert main(["score", str(tmp_path / "truth.txt"), str(tmp_path / "answer.txt")]) == 0
        out = capsys.readouterr().out.splitlines()
        taska = float(out[0].split("taska: ")[1])
        taskb = float(out[1].split("taskb: ")[1])
        assert taska == pytest.approx(score_a(gold[:, 0], pred[:, 0]))
        assert taskb == pytest.approx(score_b(gold[:, 1:], pred[:, 1:]) if six else 0.0)


@pytest.mark.parametrize(
    "answer, line, words",
    [
        ("1.jpg\t1\n2.jpg\t0\t1\n", 2, "columns"),
        ("1.jpg\t1\n2.jpg\t2\n", 2, "not 0 or 1"),
        ("1.jpg\t1\n2.jpg\t0\n1.jpg\t0\n", 3, "duplicate"),
        ("1.jpg\t1\n9.jpg\t0\n", 2, "not in"),
        ("1.jpg\t1\t0\t0\n", 1, "columns"),
    ],
)
def test_score_rejects_malformed_answers_with_line_numbers(tmp_path, answer, line, words):
    (tmp_path / "truth.txt").write_text("1.jpg\t1\t0\t1\t0\t0\n2.jpg\t0\t0\t0\t0\t0\n")
    (tmp_path / "answer.txt").write_text(answer)
    with pytest.raises(MamikitError) as err:
        score_files(tmp_path / "truth.txt", tmp_path / "answer.txt")
    assert f"answer.txt:{line}:" in str(err.value) and words in str(err.value)
    assert main(["score", str(tmp_path / "truth.txt"), str(tmp_path / "answer.txt")]) == 2


def test_score_rejects_missing_answers(tmp_path):
    (tmp_path / "truth.txt").write_text("1.jpg\t1\t0\t1\t0\t0\n2.jpg\t0\t0\t0\t0\t0\n")
    (tmp_path / "answer.txt").write_text("1.jpg\t1\n")
    with pytest.raises(MamikitError, match="no answer for 1 file names"):
        score_files(tmp_path / "truth.txt", tmp_path / "answer.txt")


def test_read_truth_tolerates_crlf_and_bom(tmp_path):
    (tmp_path / "t.txt").write_bytes(b"\xef\xbb\xbf1.jpg\t1\t0\t1\t0\t0\r\n2.jpg\t0\t0\t0\t0\t0\r\n")
    ids, gold = read_truth(tmp_path / "t.txt")
    assert ids == ["1.jpg", "2.jpg"] and gold.shape == (2, 5)
