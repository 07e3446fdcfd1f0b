"""Hand-built model configurations for unit tests: any Experiment, Profile or ModelConfig field by name.

A ModelConfig is an experiment at a profile's sizes (mamikit.model); the unit
tests vary single switches on tiny random models, so this helper takes the
fields of all three by name and builds each object from its own. The switches
start where the unit tests have always started (no BERT pooler, no head
dropout, DETR positions by rank), so that a test turning one on compares it
with the same model without it.
"""

from __future__ import annotations

import dataclasses

from mamikit.experiments import Experiment, get_experiment
from mamikit.model import ModelConfig
from mamikit.profiles import Profile

UNIT_SWITCHES = dict(bert_pooler=False, head_dropout=0.0, detr_slot_positions=False)
UNIT_PROFILE = Profile(name="unit", clip_model="unit", clip_pretrained=None, detr_model="unit", text_model="unit",
                       weights="random")
UNCASED_BERT_IDS = dict(cls_token_id=101, sep_token_id=102)  # [CLS] and [SEP] of uncased BERT vocabularies

_EXPERIMENT = {f.name for f in dataclasses.fields(Experiment)}
_PROFILE = {f.name for f in dataclasses.fields(Profile)}


def model_config(tasks, clip_dim: int, detr_dim: int, **fields) -> ModelConfig:
    """Experiment "02" (multi encoders, the decoder) with `fields` applied where each belongs."""
    switches = {k: fields.pop(k) for k in list(fields) if k in _EXPERIMENT}
    sizes = {k: fields.pop(k) for k in list(fields) if k in _PROFILE}
    experiment = get_experiment("02", **dict(UNIT_SWITCHES, **switches))
    profile = dataclasses.replace(UNIT_PROFILE, **sizes)
    return ModelConfig(experiment, profile, tuple(tasks), clip_dim, detr_dim, **dict(UNCASED_BERT_IDS, **fields))
