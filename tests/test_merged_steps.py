"""Merged micro-batches (`TrainConfig.merge_batches`): one forward and backward pass for several batches of a
window, the same gradients, loss rows and running predictions as the batches one by one."""

import json

import numpy as np
import pytest
import torch
from torch import nn

from mamikit.evaluation import batch_for
from mamikit.experiments import experiment_tasks, get_experiment
from mamikit.losses import label_pos_weights
from mamikit.profiles import get_profile
from mamikit.runs import build_model, prepare_data
from mamikit.store import FeatureStore
from mamikit.train import StepPlan, TrainConfig, merge_groups, train, train_step, train_steps


def _without_dropout(model):
    """Every dropout of the model at 0, so that a merged pass draws nothing the separate ones would not."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        elif isinstance(module, nn.MultiheadAttention):
            module.dropout = 0.0
    return model


def _model_and_data(name, tiny_data, tiny_store, fast_path):
    store = FeatureStore(tiny_store)
    experiment = get_experiment(name)
    tasks = experiment_tasks(experiment)
    torch.manual_seed(0)
    model = build_model(experiment, get_profile("demo"), store.dims, tasks, "cpu", store.special_ids)
    if not fast_path:
        import dataclasses

        model.cfg = dataclasses.replace(model.cfg, fast_path=False)
        for layer in model.decoder:
            layer.fast_path = False
    data = prepare_data(experiment, tiny_data, store)
    return _without_dropout(model).train(), experiment, tasks, data


@pytest.mark.parametrize("fast_path", [True, False])
@pytest.mark.parametrize("name", ["13", "30"])
def test_merged_micro_batches_give_the_separate_gradients_terms_and_probabilities(name, fast_path, tiny_data,
                                                                                  tiny_store):
    model, experiment, tasks, data = _model_and_data(name, tiny_data, tiny_store, fast_path)
    assert model.cfg.fast_path == fast_path
    split = data[("MAMI", "train")]
    pos_weight = label_pos_weights(tasks, {"MAMI": (split.targets, split.labels)}) if experiment.pos_weight else None
    parts = [np.arange(0, 8), np.arange(20, 28), np.arange(40, 45)]  # the last micro-batch smaller, as an epoch's
    params = [p for p in model.parameters() if p.requires_grad]

    model.zero_grad(set_to_none=True)
    apart = [train_step(model, batch_for(model, experiment, split, index, True), experiment, tasks, 4,
                        pos_weight=pos_weight, return_probs=True) for index in parts]
    grads_apart = [None if p.grad is None else p.grad.clone() for p in params]

    model.zero_grad(set_to_none=True)
    merged = batch_for(model, experiment, split, np.concatenate(parts), True)
    together = train_steps(model, merged, [len(i) for i in parts], experiment, tasks, 4, pos_weight=pos_weight,
                           return_probs=True)
    assert len(together) == len(parts)
    for p, g in zip(params, grads_apart):
        assert (p.grad is None) == (g is None)
        if g is not None:
            torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-6)
    assert any(g is not None and g.abs().sum() > 0 for g in grads_apart)
    for (terms_a, probs_a), (terms_b, probs_b), index in zip(apart, together, parts):
        assert terms_a.keys() == terms_b.keys()
        for key in terms_a:
            torch.testing.assert_close(terms_b[key], terms_a[key], rtol=1e-5, atol=1e-6)
        for task in probs_a:
            assert probs_b[task].shape == (len(index), probs_a[task].shape[1])
            torch.testing.assert_close(probs_b[task], probs_a[task], rtol=1e-5, atol=1e-6)
    if experiment.contrastive:  # eq. 3-4's pairs stay within a micro-batch: the loss of all 21 memes differs
        whole = train_step(model, merged, experiment, tasks, 4, pos_weight=pos_weight)
        mean = sum(t["MAMI/contrastive"] for t, _ in together) / 3
        assert not torch.isclose(whole["MAMI/contrastive"], mean, rtol=1e-4)


def test_groups_end_at_window_ends_evaluation_points_and_the_epoch():
    order = [(ds, np.arange(k, k + 2)) for k, ds in enumerate("ABAABBAB")]
    plan = StepPlan(n_batches=8, epochs=2, accumulation=5)
    # epoch 0: windows end after batches 5 (b = 4) and 10 (the next epoch's b = 1); an evaluation after 3 batches
    assert merge_groups(plan, 0, 0, order, {3, 8}, True) == [[0, 2], [1]]
    assert merge_groups(plan, 0, 3, order, {3, 8}, True) == [[3], [4]]
    assert merge_groups(plan, 0, 5, order, {3, 8}, True) == [[5, 7], [6]]  # up to the epoch's end
    assert merge_groups(plan, 1, 0, order, {3, 8}, True) == [[0], [1]]  # the carried window closes after b = 1
    assert merge_groups(plan, 0, 0, order, {3, 8}, False) == [[0]]


def _loss_rows(run):
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()
            if json.loads(line).get("kind") == "loss"]


def _assert_close(a, b, where=""):
    """Rows read from JSON equal, floats to 1e-4 relative."""
    if isinstance(b, dict):
        assert a.keys() == b.keys(), where
        for key in b:
            _assert_close(a[key], b[key], f"{where}/{key}")
    elif isinstance(b, float):
        assert a == pytest.approx(b, rel=1e-4, abs=1e-5), where
    else:
        assert a == b, where


def test_a_run_with_merged_batches_logs_the_rows_of_one_batch_by_one(tiny_data, tiny_store, tmp_path, monkeypatch):
    """Experiment 30, dropout off: the same loss rows (in number, order and value) and evaluation scores."""
    import mamikit.train as train_module

    real = train_module.build_model
    monkeypatch.setattr(train_module, "build_model", lambda *a, **k: _without_dropout(real(*a, **k)))
    runs = {}
    for merge in (True, False):
        cfg = TrainConfig(epochs=1, evals_per_epoch=2, accumulation=4, batch_size=8, eval_batch_size=32,
                          device="cpu", merge_batches=merge)
        runs[merge] = train("30", tiny_data, tiny_store, tmp_path / str(merge), train_cfg=cfg, progress=False)
    rows = {merge: _loss_rows(run) for merge, run in runs.items()}
    assert len(rows[True]) == len(rows[False]) >= 4
    for a, b in zip(rows[True], rows[False]):
        _assert_close(a, b)
    scores = {merge: [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()
                      if json.loads(line).get("kind") != "loss"] for merge, run in runs.items()}
    assert len(scores[True]) == len(scores[False])
    for a, b in zip(scores[True], scores[False]):
        assert a["value"] == pytest.approx(b["value"], rel=1e-3, abs=1e-4)
    assert json.loads((runs[True] / "config.json").read_text())["train"]["merge_batches"] is True
