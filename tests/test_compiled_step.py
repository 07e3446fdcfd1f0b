"""The compiled training step (`TrainConfig.compile`, `train.compiled_step`): experiment 30's training forward pass
traces into one graph per dataset, whatever the batch size, and the traced step gives the eager step's gradients,
loss terms and probabilities. The traces run on TorchDynamo and AOTAutograd with the "aot_eager" backend (the
graphs inductor would compile, without minutes of C++ compilation: bench/step_overhead.py --compile measures that),
and a whole run on TorchDynamo's "eager" backend (the graph's operators as they are)."""

import json

import numpy as np
import pytest
import torch
from torch._dynamo.utils import counters

from mamikit.evaluation import batch_for
from mamikit.losses import label_pos_weights
from mamikit.train import DYNAMO_CONFIG, TrainConfig, compiled_step, train, train_steps

from test_merged_steps import _assert_close, _loss_rows, _model_and_data, _without_dropout


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test traces from nothing: no graph or counter of another test's."""
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def test_experiment_30s_training_forward_is_one_graph_per_dataset(tiny_data, tiny_store):
    model, experiment, _, data = _model_and_data("30", tiny_data, tiny_store, True)
    model.train()
    with torch._dynamo.config.patch(**DYNAMO_CONFIG):
        for dataset in ("MAMI", "FBHM"):
            batch = batch_for(model, experiment, data[(dataset, "train")], np.arange(12), True)
            explained = torch._dynamo.explain(model)(batch)
            assert explained.graph_break_count == 0, [r.reason for r in explained.break_reasons]
            assert explained.graph_count == 1


def test_the_compiled_step_gives_the_eager_gradients_terms_and_probabilities(tiny_data, tiny_store):
    model, experiment, tasks, data = _model_and_data("30", tiny_data, tiny_store, True)
    params = [p for p in model.parameters() if p.requires_grad]
    step = compiled_step(model, backend="aot_eager")
    for dataset, sizes in (("MAMI", [8, 8, 5]), ("MAMI", [7])):
        split = data[(dataset, "train")]
        pos_weight = label_pos_weights(tasks, {dataset: (split.targets, split.labels)})
        batch = batch_for(model, experiment, split, np.arange(sum(sizes)), True)
        results = {}
        for name, runner in (("eager", model), ("compiled", step)):
            model.zero_grad(set_to_none=True)
            out = train_steps(runner, batch, sizes, experiment, tasks, 4, pos_weight=pos_weight, return_probs=True)
            results[name] = (out, [None if p.grad is None else p.grad.clone() for p in params])
        (eager, eager_grads), (compiled, compiled_grads) = results["eager"], results["compiled"]
        assert any(g is not None and g.abs().sum() > 0 for g in eager_grads)
        for a, b in zip(compiled_grads, eager_grads):
            assert (a is None) == (b is None)
            if b is not None:
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        for (terms_a, probs_a), (terms_b, probs_b) in zip(compiled, eager):
            assert terms_a.keys() == terms_b.keys()
            for key in terms_b:
                torch.testing.assert_close(terms_a[key], terms_b[key], rtol=1e-5, atol=1e-6)
            for task in probs_b:
                torch.testing.assert_close(probs_a[task], probs_b[task], rtol=1e-5, atol=1e-6)
    # a batch of another size (7 memes, 21 merged) is the same graph, not a recompile
    assert counters["stats"]["unique_graphs"] == 1


def test_a_compiled_run_logs_the_eager_runs_rows(tiny_data, tiny_store, tmp_path, monkeypatch):
    """Experiment 30, dropout off, one epoch: TrainConfig.compile trains through compiled_step and logs the eager
    run's loss rows and scores; the setting is recorded and never compared (runs.COMPUTED_HOW)."""
    import mamikit.train as train_module

    real_build, real_compile = train_module.build_model, train_module.compiled_step
    compiled = []
    monkeypatch.setattr(train_module, "build_model", lambda *a, **k: _without_dropout(real_build(*a, **k)))
    monkeypatch.setattr(train_module, "compiled_step",
                        lambda model: compiled.append(model) or real_compile(model, backend="eager"))
    runs = {}
    for on in (True, False):
        cfg = TrainConfig(epochs=1, evals_per_epoch=2, accumulation=4, batch_size=8, eval_batch_size=32,
                          device="cpu", compile=on)
        runs[on] = train("30", tiny_data, tiny_store, tmp_path / str(on), train_cfg=cfg, progress=False)
    assert len(compiled) == 1
    rows = {on: _loss_rows(run) for on, run in runs.items()}
    assert len(rows[True]) == len(rows[False]) >= 4
    for a, b in zip(rows[True], rows[False]):
        _assert_close(a, b)
    assert json.loads((runs[True] / "config.json").read_text())["train"]["compile"] is True
    resumed = train("30", tiny_data, tiny_store, runs[True], progress=False, resume=True,
                    train_cfg=TrainConfig(epochs=1, evals_per_epoch=2, accumulation=4, batch_size=8,
                                          eval_batch_size=32, device="cpu", compile=False))
    assert resumed == runs[True]  # complete: compile is how a run is computed, not what it is
