"""Tests of mamikit.losses: each vectorised loss against a plain loop over pairs (section 3.5)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from mamikit.losses import (
    bce_loss,
    contrastive_embedding_loss,
    contrastive_loss_as_coded,
    dataset_loss,
    label_pos_weights,
    projection_alignment_loss,
    query_alignment_loss,
    task_loss,
)
from mamikit.model import Batch, ModelOutput
from mamikit.utils import MamikitError

from mamikit.data import Task

pytestmark = pytest.mark.smoke  # every loss: quick, and what any version change could break


def _cos(a, b):
    return float(F.cosine_similarity(a, b, dim=0, eps=1e-12))


def _slow_alignment(f, g):
    n, p = f.shape[:2]
    if n < 2:
        return 0.0
    per_position = []
    for k in range(p):
        total = 0.0
        for i in range(n):
            for j in range(n):
                if i != j:
                    total += abs(_cos(f[i, k], f[j, k]) - _cos(g[i, k], g[j, k]))
        per_position.append(total / (n * (n - 1)))
    return sum(per_position) / p


def _slow_contrastive(layers, y, valid=None):
    n, c = y.shape
    valid = torch.ones_like(y, dtype=torch.bool) if valid is None else valid
    total, count = 0.0, 0
    for i in range(n):
        for j in range(n):
            for k in range(c):
                if i == j or not (valid[i, k] and valid[j, k]):
                    continue
                s_c = float((2 * y[i, k] - 1) * (2 * y[j, k] - 1))
                total += 0.5 * sum(1 - s_c * _cos(h[i, k], h[j, k]) for h in layers)
                count += 1
    return total / count if count else 0.0


def _slow_bce(logits, y, valid=None):
    valid = torch.ones_like(y, dtype=torch.bool) if valid is None else valid
    terms = []
    for i in range(y.shape[0]):
        for k in range(y.shape[1]):
            if valid[i, k]:
                p = 1 / (1 + math.exp(-float(logits[i, k])))
                t = float(y[i, k])
                terms.append(-(t * math.log(p) + (1 - t) * math.log(1 - p)))
    return float(sum(terms) / len(terms))


@pytest.mark.parametrize("n", [1, 2, 3, 6])
def test_projection_alignment_matches_pair_loop(n):
    g = torch.Generator().manual_seed(n)
    f = torch.randn(n, 4, 7, generator=g, dtype=torch.float64)
    proj = torch.randn(n, 4, 5, generator=g, dtype=torch.float64)
    got = projection_alignment_loss(f, proj)
    assert got.shape == ()
    assert float(got) == pytest.approx(_slow_alignment(f, proj), abs=1e-12)


def test_projection_alignment_is_zero_for_a_similarity_preserving_map():
    g = torch.Generator().manual_seed(0)
    f = torch.randn(5, 3, 8, generator=g, dtype=torch.float64)
    rotation, _ = torch.linalg.qr(torch.randn(8, 8, generator=g, dtype=torch.float64))
    assert float(projection_alignment_loss(f, 3.0 * f @ rotation)) == pytest.approx(0.0, abs=1e-12)
    assert float(projection_alignment_loss(f, torch.randn(5, 3, 8, generator=g, dtype=torch.float64))) > 0.1


def test_projection_alignment_trains_the_projection():
    torch.manual_seed(0)
    proj = torch.nn.Linear(6, 4)
    f = torch.randn(5, 2, 6)
    projection_alignment_loss(f, proj(f)).backward()
    assert proj.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("n,c,layers", [(1, 3, 2), (2, 1, 2), (2, 4, 1), (5, 3, 2), (7, 5, 3)])
def test_contrastive_matches_pair_loop(n, c, layers):
    g = torch.Generator().manual_seed(10 * n + c)
    inputs = [torch.randn(n, c, 3 + l, generator=g, dtype=torch.float64) for l in range(layers)]
    y = torch.randint(0, 2, (n, c), generator=g).double()
    got = contrastive_embedding_loss(inputs, y)
    assert float(got) == pytest.approx(_slow_contrastive(inputs, y), abs=1e-12)


def test_contrastive_with_unknown_targets_matches_pair_loop():
    g = torch.Generator().manual_seed(3)
    inputs = [torch.randn(6, 4, 5, generator=g, dtype=torch.float64) for _ in range(2)]
    y = torch.randint(0, 2, (6, 4), generator=g).double()
    valid = torch.rand(6, 4, generator=g) > 0.3
    y_unknown = torch.where(valid, y, torch.full_like(y, -1.0))
    got = contrastive_embedding_loss(inputs, y_unknown, valid)
    assert float(got) == pytest.approx(_slow_contrastive(inputs, y, valid), abs=1e-12)


def test_contrastive_pulls_same_labels_together():
    # Two identical embeddings: no loss when their labels agree, 1 per layer (1/2 (1 + 1)) when they differ.
    h = torch.ones(2, 1, 3, dtype=torch.float64)
    same = contrastive_embedding_loss([h], torch.tensor([[1.0], [1.0]], dtype=torch.float64))
    different = contrastive_embedding_loss([h], torch.tensor([[1.0], [0.0]], dtype=torch.float64))
    assert float(same) == pytest.approx(0.0) and float(different) == pytest.approx(1.0)


def test_contrastive_on_an_expanded_vector_equals_the_repeated_one():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 2, (4, 3), generator=g).double()
    expanded = contrastive_embedding_loss([x.unsqueeze(1).expand(-1, 3, -1)], y)
    repeated = contrastive_embedding_loss([x.unsqueeze(1).repeat(1, 3, 1)], y)
    torch.testing.assert_close(expanded, repeated)


@pytest.mark.parametrize("n", [1, 2, 5])
def test_bce_matches_loop_and_masks_unknown(n):
    g = torch.Generator().manual_seed(n)
    logits = torch.randn(n, 3, generator=g, dtype=torch.float64)
    y = torch.randint(0, 2, (n, 3), generator=g).double()
    assert float(bce_loss(logits, y)) == pytest.approx(_slow_bce(logits, y), abs=1e-12)
    valid = torch.ones(n, 3, dtype=torch.bool)
    valid[0, 1] = False
    y_unknown = y.clone()
    y_unknown[0, 1] = -1
    assert float(bce_loss(logits, y_unknown, valid)) == pytest.approx(_slow_bce(logits, y, valid), abs=1e-12)


# ------------------------------------------------------------------ equations 5 and 6

LABELS = ("misogynous", "shaming", "stereotype")
TASKS = (
    Task("MAMI", "MAMI", LABELS),
    Task("Task_A", "MAMI", ("misogynous",)),
    Task("Task_B", "MAMI", LABELS[1:]),
    Task("Hateful", "FBHM", ("hateful",)),
)


def _output_and_batch(n=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    targets = torch.randint(0, 2, (n, 3), generator=g).double()
    logits, inputs = {}, {}
    for task in TASKS[:3]:
        k = len(task.labels)
        logits[task.name] = torch.randn(n, k, generator=g, dtype=torch.float64, requires_grad=True)
        inputs[task.name] = [torch.randn(n, k, 4, generator=g, dtype=torch.float64) for _ in range(2)]
    f = torch.randn(n, 5, 6, generator=g, dtype=torch.float64)
    proj = torch.randn(n, 5, 4, generator=g, dtype=torch.float64)
    f2 = torch.randn(n, 9, 3, generator=g, dtype=torch.float64)
    proj2 = torch.randn(n, 9, 4, generator=g, dtype=torch.float64)
    output = ModelOutput(logits=logits, mlp_inputs=inputs, projections={"clip": (f, proj), "detr": (f2, proj2)})
    batch = Batch(
        dataset="MAMI", ids=[str(i) for i in range(n)], labels=LABELS, targets=targets, clip=None, detr=None,
        detr_mask=None, detr_all=None, text_ids=torch.zeros(n, 2, dtype=torch.long),
        text_mask=torch.ones(n, 2, dtype=torch.bool),
    )
    return output, batch


def test_task_loss_is_equation_5():
    output, batch = _output_and_batch()
    task = TASKS[2]
    y = batch.targets[:, 1:]
    l0 = bce_loss(output.logits["Task_B"], y)
    l1 = sum(projection_alignment_loss(f, g) for f, g in output.projections.values())
    l2 = contrastive_embedding_loss(output.mlp_inputs["Task_B"], y)
    cases = {(False, False): l0, (True, False): l0 + l1, (False, True): l0 + l2, (True, True): l0 + l1 + l2}
    for (align, contrast), expected in cases.items():
        loss, parts = task_loss(output, batch, task, proj_align=align, contrastive=contrast)
        torch.testing.assert_close(loss, expected)
        assert ("proj_align" in parts) == align and ("contrastive" in parts) == contrast
        torch.testing.assert_close(parts["bce"], l0.detach())


def test_task_targets_are_picked_by_label_name():
    output, batch = _output_and_batch()
    order = [2, 0, 1]
    shuffled = dataclasses.replace(batch, labels=tuple(LABELS[i] for i in order), targets=batch.targets[:, order])
    for task in TASKS[:3]:
        a = task_loss(output, batch, task, True, True)[0]
        b = task_loss(output, shuffled, task, True, True)[0]
        torch.testing.assert_close(a, b)


def test_unknown_targets_do_not_contribute():
    output, batch = _output_and_batch()
    batch.targets[0, 1:] = -1  # row 0's Task_B labels are unknown
    before = task_loss(output, batch, TASKS[2], False, True)[0]
    output.logits["Task_B"].data[0] += 5.0
    output.mlp_inputs["Task_B"][0][0] += 3.0
    after = task_loss(output, batch, TASKS[2], False, True)[0]
    torch.testing.assert_close(before, after)
    batch.targets[:, 1:] = -1  # nothing known: a zero that still back-propagates
    loss = task_loss(output, batch, TASKS[2], False, True)[0]
    loss.backward()
    assert float(loss.detach()) == 0.0


def test_dataset_loss_is_the_mean_over_the_dataset_tasks():
    output, batch = _output_and_batch()
    total, parts = dataset_loss(output, batch, TASKS, proj_align=True, contrastive=True)
    per_task = [task_loss(output, batch, t, True, True)[0] for t in TASKS[:3]]
    torch.testing.assert_close(total, torch.stack(per_task).mean())
    assert "Hateful/loss" not in parts and "Task_A/contrastive" in parts and "proj_align" in parts
    torch.testing.assert_close(parts["Task_B/loss"], per_task[2].detach())
    total.backward()
    assert output.logits["Task_A"].grad is not None


def test_missing_targets_or_labels_are_reported():
    output, batch = _output_and_batch()
    with pytest.raises(MamikitError, match="no targets"):
        task_loss(output, dataclasses.replace(batch, targets=None), TASKS[0], False, False)
    with pytest.raises(MamikitError, match="hateful"):
        task_loss(output, batch, Task("X", "MAMI", ("hateful",)), False, False)
    with pytest.raises(MamikitError, match="no task"):
        dataset_loss(output, dataclasses.replace(batch, dataset="OTHER"), TASKS, False, False)


def test_weighted_bce_equals_torch_bce_with_logits_loss_by_hand():
    output, batch = _output_and_batch(n=6)
    counts = torch.tensor([[1, 0, 0], [0, 1, 0], [1, 1, -1], [0, 0, 1], [0, 0, 0], [1, 0, 1]]).double()
    weights = label_pos_weights(TASKS[:3], {"MAMI": (counts.numpy(), LABELS)})
    neg_pos = {LABELS[0]: 3 / 3, LABELS[1]: 4 / 2, LABELS[2]: 3 / 2}  # the -1 is counted as neither
    assert weights == {task.name: {label: neg_pos[label] for label in task.labels} for task in TASKS[:3]}
    total, parts = dataset_loss(output, batch, TASKS, proj_align=False, contrastive=False, pos_weight=weights)
    by_hand = []
    for task in TASKS[:3]:
        cols = [LABELS.index(label) for label in task.labels]
        criterion = torch.nn.BCEWithLogitsLoss(
            pos_weight=torch.tensor([neg_pos[label] for label in task.labels]).double())
        by_hand.append(criterion(output.logits[task.name], batch.targets[:, cols]))
        torch.testing.assert_close(parts[f"{task.name}/bce"], by_hand[-1].detach())
    torch.testing.assert_close(total, torch.stack(by_hand).mean())
    unweighted, _ = dataset_loss(output, batch, TASKS, proj_align=False, contrastive=False)
    assert not torch.allclose(total, unweighted)


def test_alignment_over_all_pairs_includes_the_diagonal():
    g = torch.Generator().manual_seed(1)
    f, proj = torch.randn(4, 3, 5, generator=g), torch.randn(4, 3, 6, generator=g)
    off = projection_alignment_loss(f, proj)
    everything = projection_alignment_loss(f, proj, all_pairs=True)
    # The diagonal differences are 0 (cos(x, x) = 1 on both sides): the sum is the same over 16 instead of 12 pairs.
    torch.testing.assert_close(everything, off * 12 / 16)


# ------------------------------------------------------------------ eq. 3-4 as the authors' code (fidelity.md row 8)


def _slow_coded_term(h, y, valid=None):
    """One layer's term by the authors' rule, pair by pair: no negative-negative pairs, positive pairs at half."""
    n, c = y.shape
    valid = torch.ones_like(y, dtype=torch.bool) if valid is None else valid
    total, count = 0.0, 0
    for k in range(c):
        for i in range(n):
            for j in range(n):
                if i == j or not (valid[i, k] and valid[j, k]) or (y[i, k] == 0 and y[j, k] == 0):
                    continue
                s_c = float((2 * y[i, k] - 1) * (2 * y[j, k] - 1))
                weight = 0.5 if s_c > 0 else 1.0
                total += weight * 0.5 * (1 - s_c * _cos(h[i, k], h[j, k]))
                count += 1
    return 0.5 * total / count if count else 0.0


@pytest.mark.parametrize("n,c", [(2, 1), (6, 4), (9, 5)])
def test_contrastive_as_coded_matches_pair_loop_and_counts_the_hidden_layer_twice(n, c):
    g = torch.Generator().manual_seed(n + c)
    y = torch.randint(0, 2, (n, c), generator=g).double()
    x, h = (torch.randn(n, c, 5, generator=g, dtype=torch.float64) for _ in range(2))
    trained, logged = contrastive_loss_as_coded([x, h], y)
    lx, lh = _slow_coded_term(x, y), _slow_coded_term(h, y)
    assert float(trained) == pytest.approx(lx + 2 * lh, abs=1e-12)
    assert float(logged) == pytest.approx(lx + lh, abs=1e-12)
    valid = torch.rand(n, c, generator=g) > 0.3
    trained, logged = contrastive_loss_as_coded([x, h], torch.where(valid, y, torch.full_like(y, -1)), valid)
    assert float(logged) == pytest.approx(_slow_coded_term(x, y, valid) + _slow_coded_term(h, y, valid), abs=1e-12)


def test_contrastive_as_coded_ignores_negative_pairs_and_differs_from_the_equations():
    y = torch.zeros(4, 1, dtype=torch.float64)  # all negative: no pair counts
    x = torch.randn(4, 1, 3, dtype=torch.float64, requires_grad=True)
    trained, logged = contrastive_loss_as_coded([x, x * 2], y)
    assert float(trained.detach()) == 0.0 and float(logged.detach()) == 0.0
    trained.backward()  # still part of the graph
    y = torch.tensor([[1.0], [0.0], [1.0], [0.0]], dtype=torch.float64)
    printed = contrastive_embedding_loss([x, x * 2], y)
    assert float(contrastive_loss_as_coded([x, x * 2], y)[1].detach()) != pytest.approx(float(printed.detach()))


def test_task_loss_trains_the_coded_contrastive_term_and_logs_what_the_code_logs():
    output, batch = _output_and_batch()
    y = batch.targets[:, 1:]
    l0 = bce_loss(output.logits["Task_B"], y)
    trained, logged = contrastive_loss_as_coded(output.mlp_inputs["Task_B"], y)
    loss, parts = task_loss(output, batch, TASKS[2], proj_align=False, contrastive=True, contrastive_as_coded=True)
    torch.testing.assert_close(loss, l0 + trained)
    torch.testing.assert_close(parts["contrastive"], logged.detach())
    total, parts = dataset_loss(output, batch, TASKS, False, True, contrastive_as_coded=True)
    torch.testing.assert_close(parts["Task_B/contrastive"], logged.detach())


# ------------------------------------------------------------------ query alignment (section 6's future work)


def _slow_query_alignment(outputs, queries, y, valid=None):
    """1 - cos(o_ic, q_c) averaged over the known positive (meme, label) pairs, one pair at a time."""
    n, c = y.shape
    valid = torch.ones_like(y, dtype=torch.bool) if valid is None else valid
    total, count = 0.0, 0
    for i in range(n):
        for k in range(c):
            if valid[i, k] and y[i, k] == 1:
                total += 1 - _cos(outputs[i, k], queries[k])
                count += 1
    return total / count if count else 0.0


@pytest.mark.parametrize("n,c", [(1, 1), (3, 2), (6, 5)])
def test_query_alignment_matches_loop(n, c):
    g = torch.Generator().manual_seed(7 * n + c)
    outputs = torch.randn(n, c, 6, generator=g, dtype=torch.float64)
    queries = torch.randn(c, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 2, (n, c), generator=g).double()
    y[0, 0] = 1  # at least one positive
    got = query_alignment_loss(outputs, queries, y)
    assert got.shape == () and float(got) > 0
    assert float(got) == pytest.approx(_slow_query_alignment(outputs, queries, y), abs=1e-12)
    valid = torch.rand(n, c, generator=g) > 0.3
    y_unknown = torch.where(valid, y, torch.full_like(y, -1.0))
    got = query_alignment_loss(outputs, queries, y_unknown, valid)
    assert float(got) == pytest.approx(_slow_query_alignment(outputs, queries, y, valid), abs=1e-12)


def test_query_alignment_is_zero_when_every_positive_points_at_its_query():
    g = torch.Generator().manual_seed(2)
    queries = torch.randn(3, 5, generator=g, dtype=torch.float64)
    y = torch.tensor([[1, 0, 1], [0, 1, 1], [1, 1, 0], [0, 0, 0]], dtype=torch.float64)
    outputs = torch.randn(4, 3, 5, generator=g, dtype=torch.float64)  # negatives anywhere
    scale = torch.rand(4, 3, 1, generator=g, dtype=torch.float64) * 3 + 0.1
    aligned = torch.where(y.bool().unsqueeze(-1), scale * queries.unsqueeze(0), outputs)  # a length, no direction
    assert float(query_alignment_loss(aligned, queries, y)) == pytest.approx(0.0, abs=1e-12)
    opposite = torch.where(y.bool().unsqueeze(-1), -aligned, aligned)
    assert float(query_alignment_loss(opposite, queries, y)) == pytest.approx(2.0, abs=1e-12)


def test_query_alignment_ignores_negatives_and_unknown_labels():
    g = torch.Generator().manual_seed(4)
    outputs = torch.randn(5, 3, 4, generator=g, dtype=torch.float64)
    queries = torch.randn(3, 4, generator=g, dtype=torch.float64)
    y = torch.tensor([[1, 0, -1], [0, 1, 1], [-1, -1, 0], [1, 1, 0], [0, 0, 1]], dtype=torch.float64)
    valid = y >= 0
    before = query_alignment_loss(outputs, queries, y, valid)
    moved = outputs.clone()
    moved[~(valid & (y == 1))] = torch.randn(int((~(valid & (y == 1))).sum()), 4, generator=g, dtype=torch.float64)
    torch.testing.assert_close(query_alignment_loss(moved, queries, y, valid), before)
    # without the mask a -1 is still no positive
    torch.testing.assert_close(query_alignment_loss(outputs, queries, y), before)
    nothing = query_alignment_loss(outputs.requires_grad_(), queries, torch.zeros(5, 3, dtype=torch.float64))
    nothing.backward()  # no positive: a zero that still back-propagates
    assert float(nothing.detach()) == 0.0 and float(outputs.grad.abs().sum()) == 0.0


def test_query_alignment_trains_the_positive_outputs_and_not_the_queries():
    g = torch.Generator().manual_seed(5)
    outputs = torch.randn(4, 2, 6, generator=g, dtype=torch.float64, requires_grad=True)
    queries = torch.randn(2, 6, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([[1, 0], [0, 1], [1, 1], [0, 0]], dtype=torch.float64)
    loss = query_alignment_loss(outputs, queries, y)
    loss.backward()
    assert queries.grad is None  # a fixed target: the query is not pulled toward the outputs
    positive = y.bool()
    assert bool((outputs.grad[positive].abs().sum(-1) > 0).all())
    assert float(outputs.grad[~positive].abs().sum()) == 0.0
    with torch.no_grad():  # a small step against the gradient brings every positive closer to its query
        stepped = outputs - 0.1 * outputs.grad
    assert float(query_alignment_loss(stepped, queries, y)) < float(loss.detach())


def _with_decoder(output, n: int, per_task: bool = True, seed: int = 0):
    """`output` with decoder rows (B, R, 4) and class queries, as the model gives them (per task or jointly)."""
    g = torch.Generator().manual_seed(seed)
    query_labels = LABELS + ("hateful",)
    if per_task:
        rows = tuple((t.name, label) for t in TASKS[:3] for label in t.labels)
    else:
        rows = tuple((None, label) for label in query_labels)
    return dataclasses.replace(
        output, decoder_out=torch.randn(n, len(rows), 4, generator=g, dtype=torch.float64, requires_grad=True),
        decoder_rows=rows, queries=torch.randn(len(query_labels), 4, generator=g, dtype=torch.float64),
        query_labels=query_labels)


@pytest.mark.parametrize("per_task", [True, False])
def test_task_loss_adds_query_alignment_on_the_task_rows(per_task):
    output, batch = _output_and_batch()
    output = _with_decoder(output, 5, per_task)
    batch.targets[1, 2] = -1
    task = TASKS[2]  # Task_B: shaming, stereotype
    y = batch.targets[:, 1:]
    valid = y >= 0
    names = [(task.name if per_task else None, label) for label in task.labels]
    rows = output.decoder_out[:, [output.decoder_rows.index(r) for r in names]]
    queries = output.queries[[1, 2]]  # the queries of shaming and stereotype
    lq = _slow_query_alignment(rows.detach(), queries, y, valid)
    loss, parts = task_loss(output, batch, task, proj_align=False, contrastive=False, query_align=True)
    plain, plain_parts = task_loss(output, batch, task, proj_align=False, contrastive=False)
    assert float((loss - plain).detach()) == pytest.approx(lq, abs=1e-12)
    assert float(parts["query_align"]) == pytest.approx(lq, abs=1e-12) and "query_align" not in plain_parts
    total, parts = dataset_loss(output, batch, TASKS, proj_align=False, contrastive=False, query_align=True)
    assert {"MAMI/query_align", "Task_A/query_align", "Task_B/query_align"} <= set(parts)
    total.backward()
    grad = output.decoder_out.grad.abs().sum((0, 2))  # (R,)
    used = [output.decoder_rows.index(r) for r in names]
    assert bool((grad[used] > 0).all())
    if not per_task:
        assert float(grad[output.decoder_rows.index((None, "hateful"))]) == 0.0  # no MAMI task holds it


def test_query_alignment_needs_the_decoder():
    output, batch = _output_and_batch()
    with pytest.raises(MamikitError, match="query_align needs the decoder"):
        task_loss(output, batch, TASKS[0], False, False, query_align=True)
    output = _with_decoder(output, 5)
    output = dataclasses.replace(output, query_labels=LABELS[:2])
    with pytest.raises(MamikitError, match="stereotype"):
        task_loss(output, batch, TASKS[0], False, False, query_align=True)
