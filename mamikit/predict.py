"""Classify one meme with a trained run: the full pipeline of figure 1 on a single input.

The image goes through the run's frozen backbones (section 3.1: CLIP whole +
2x2 crops, DETR queries with the no-object mask, text tokens), then through the
trained encoders, decoder and MLP heads. Every task of every dataset the run
was trained on is answered (Task_A, Task_B and MAMI; Hateful for multi-task
runs), with the 0.5 threshold the answer files use.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from . import evaluation, runs
from .evaluation import THRESHOLD  # the answer files' threshold
from .store import read_manifest, store_dir, store_dtype
from .utils import MamikitError, open_image_rgb


def _store_dtype(config: dict) -> torch.dtype | None:
    """The feature store's precision: training saw features rounded to it, so prediction does too."""
    try:
        dtype = store_dtype(read_manifest(config["features"]))
    except (MamikitError, KeyError, TypeError, AttributeError):
        dtype = "float16"
    return torch.float16 if dtype == "float16" else None


def _rounded(x: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return x.to(dtype).float() if dtype is not None else x.float()


@torch.no_grad()
def predict_meme(run_dir: str | os.PathLike, image, text: str, checkpoint: str = "best", device: str = "auto",
                 features_root=None) -> dict:
    """Probabilities and 0/1 decisions for one meme from a trained run.

    Args:
        run_dir: a run directory written by `train`.
        image: an image path or a PIL image.
        text: the meme's text transcription.
        checkpoint: "best" (best dev Task_A) or "last".
        device: "auto", "cpu" or "cuda".
        features_root: the feature store, when it moved since training (default: the one in config.json).

    Returns:
        {"run", "experiment", "checkpoint", "probabilities": {task: {label: p}},
         "predictions": {task: {label: 0/1}}, "attention_by_encoder": {encoder: share} or None
         without a decoder}.
    """
    from .backbones import detr_object_mask, load_clip, load_detr, load_text
    from .model import Batch

    loaded = runs.load_run(run_dir, checkpoint=checkpoint, device=device, features_root=features_root)
    model, experiment, dev = loaded.model, loaded.experiment, loaded.device
    image = open_image_rgb(image) if isinstance(image, (str, os.PathLike)) else image.convert("RGB")
    store = store_dir(features_root or loaded.config["features"], loaded.profile.name)
    dtype = _store_dtype({**loaded.config, "features": store})

    clip = detr = detr_mask = detr_slots = None
    if "clip" in experiment.image_encoders:
        clip = _rounded(load_clip(loaded.profile, dev).encode([image]), dtype)  # (1, 5, Dc)
    if "detr" in experiment.image_encoders:
        embeds, logits = load_detr(loaded.profile, dev).encode([image])  # (1, 100, Dd), (1, 100, 92)
        keep = detr_object_mask(logits)[0]  # (100,)
        detr = _rounded(embeds[:, keep], dtype)  # (1, Q, Dd): only the kept object queries, as in training
        detr_mask = torch.ones(detr.shape[:2], dtype=torch.bool)
        detr_slots = keep.nonzero().squeeze(1).unsqueeze(0).cpu()  # (1, Q): each kept query's slot, as in training
    ids, text_mask, hidden = load_text(loaded.profile, dev).encode([text])  # (1, T), (1, T), (1, T, Dt)
    cached = evaluation.uses_cached_text(model)  # as in training and evaluation

    probabilities, predictions, attention = {}, {}, None
    for dataset in experiment.datasets:
        tasks = [t for t in loaded.tasks if t.dataset == dataset]
        labels = tuple(dict.fromkeys(label for t in tasks for label in t.labels))
        batch = Batch(dataset=dataset, ids=["meme"], labels=labels, targets=None, clip=clip, detr=detr,
                      detr_mask=detr_mask, detr_all=None, text_ids=ids.long(), text_mask=text_mask,
                      text_hidden=_rounded(hidden, dtype) if cached else None, detr_slots=detr_slots)
        out = model(batch.to(dev), return_attention=True)
        if attention is None and out.cross_attn:
            # Figure 4b for one meme: cross-attention mass per encoder, averaged over layers and class queries.
            # (layers, C, E)
            mass = evaluation.attention_by_encoder(out.cross_attn, out.memory_mask, out.memory_segments)[0]
            attention = {enc: round(float(v), 4) for enc, v in zip(out.memory_segments, mass.mean((0, 1)))}
        for task in tasks:
            probs = torch.sigmoid(out.logits[task.name].float())[0].cpu().tolist()  # (k,)
            probabilities[task.name] = dict(zip(task.labels, probs))
            predictions[task.name] = {label: int(p >= THRESHOLD) for label, p in zip(task.labels, probs)}
    return {"run": str(Path(run_dir)), "experiment": experiment.name, "checkpoint": checkpoint,
            "probabilities": probabilities, "predictions": predictions, "attention_by_encoder": attention}
