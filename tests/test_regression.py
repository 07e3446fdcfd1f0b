"""Stored outputs: every architecture's logits and losses at toy sizes equal tests/fixtures/ (sections 3.1-3.5).

The cases (experiments 00, 01, 03, 10, 13, 30 under the "paper" and "authors"
recipes, inputs and weights from seeded generators) are built by
`tests/regression_cases.py`; the fast path and the reference path
(``fast_path=False``) must both give the stored eval-mode numbers within 1e-5,
and the fast path the stored train-mode numbers (dropout live, torch seeded).
A change in the embeddings, encoders, decoder, heads or a loss term fails here
even when both paths change alike.

When a change of the numbers is meant, regenerate the file and commit it with
the change that explains it::

    python -m tests.regression_cases --write     # or: make fixtures
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import pytest

from regression_cases import CASES, FIXTURE, TOLERANCE, build_case, flatten, load_fixture, run_case

REGENERATE = "python -m tests.regression_cases --write"


@pytest.fixture(scope="module")
def stored():
    if not FIXTURE.exists():
        pytest.fail(f"{FIXTURE} is missing; write it with `{REGENERATE}`")
    return load_fixture()


@lru_cache(maxsize=None)
def _case(case: str, fast_path: bool):
    """One build per case and path: the fast path's eval and train tests share it (a forward leaves the weights)."""
    return build_case(case, fast_path=fast_path)


def _assert_matches(got: dict, want: dict, case: str) -> None:
    """Every stored number within TOLERANCE, and no entry gained or lost; the message names the entries that moved."""
    got, want = flatten(got), flatten(want)
    assert got.keys() == want.keys(), (
        f"{case}: entries {sorted(got.keys() ^ want.keys())} differ from {FIXTURE.name}; if meant, run `{REGENERATE}`")
    moved = {}
    for key, expected in want.items():
        assert got[key].shape == expected.shape, f"{case}: {key} has shape {got[key].shape}, stored {expected.shape}"
        diff = float(np.abs(got[key] - expected).max(initial=0.0))
        if not diff <= TOLERANCE:  # NaN counts as moved
            moved[key] = diff
    assert not moved, (f"{case}: {len(moved)} stored outputs moved by more than {TOLERANCE}: "
                       + ", ".join(f"{k} ({v:.2e})" for k, v in sorted(moved.items(), key=lambda kv: -kv[1])[:6])
                       + f"; if meant, run `{REGENERATE}`")


def test_fixture_holds_every_case(stored):
    assert sorted(stored) == sorted(CASES)
    assert FIXTURE.stat().st_size < 256_000


@pytest.mark.parametrize("fast_path", [True, False], ids=["fast", "reference"])
@pytest.mark.parametrize("case", CASES)
def test_eval_forward_matches_stored_outputs(stored, case, fast_path):
    _assert_matches(run_case(_case(case, fast_path), train=False), stored[case]["eval"], case)


@pytest.mark.parametrize("case", CASES)
def test_train_forward_with_seeded_dropout_matches_stored_outputs(stored, case):
    _assert_matches(run_case(_case(case, True), train=True), stored[case]["train"], case)


def test_a_perturbed_head_fails_the_comparison(stored):
    """The comparison can fail: 2e-5 added to one head's bias moves that task's logits past the tolerance."""
    case = build_case("10/paper")
    case.model.heads["Task_A"].fc2.bias.data += 2 * TOLERANCE
    with pytest.raises(AssertionError, match="MAMI/logits/Task_A"):
        _assert_matches(run_case(case, train=False), stored["10/paper"]["eval"], "10/paper")
