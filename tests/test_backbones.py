"""Tests for mamikit.backbones (section 3.1: CLIP crops, DETR's object mask, the text tokens)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import mamikit
from mamikit.backbones import clip_crops, detr_object_mask, load_backbones, load_clip, load_detr, load_text
from mamikit.profiles import get_profile
from mamikit.utils import MamikitError

slow = pytest.mark.skipif(os.environ.get("MAMIKIT_SLOW") != "1",
                          reason="downloads pretrained weights; set MAMIKIT_SLOW=1")

QUADRANTS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]  # TL, TR, BL, BR


def _quadrant_image(w: int, h: int, seed: int = 0) -> Image.Image:
    """An image whose 2x2 quadrants have the QUADRANTS colours (plus a little seeded noise)."""
    arr = np.zeros((h, w, 3), np.uint8)
    arr[: h // 2, : w // 2], arr[: h // 2, w // 2 :] = QUADRANTS[0], QUADRANTS[1]
    arr[h // 2 :, : w // 2], arr[h // 2 :, w // 2 :] = QUADRANTS[2], QUADRANTS[3]
    noise = np.random.default_rng(seed).integers(0, 40, arr.shape)
    return Image.fromarray(np.clip(arr.astype(int) - noise, 0, 255).astype(np.uint8))


# ---------------------------------------------------------------------------- crops


def test_clip_crops_geometry_and_row_major_order():
    crops = clip_crops(_quadrant_image(300, 200))
    assert [c.size for c in crops] == [(300, 200)] + [(150, 100)] * 4
    centres = [np.asarray(c)[c.size[1] // 2, c.size[0] // 2].astype(int) for c in crops[1:]]
    for centre, colour in zip(centres, QUADRANTS):
        assert np.abs(centre - colour).max() <= 40  # noise is at most 40


def test_clip_crops_odd_sizes_cover_the_image():
    im = _quadrant_image(301, 201)
    sizes = [c.size for c in clip_crops(im)[1:]]
    assert sizes == [(150, 100), (151, 100), (150, 101), (151, 101)]  # extra pixel right / bottom
    arr = np.asarray(im)
    bottom = np.concatenate([np.asarray(c) for c in clip_crops(im)[3:]], axis=1)
    assert np.array_equal(bottom, arr[100:])  # the slices tile the image without overlap
    assert [c.size for c in clip_crops(Image.new("RGB", (1, 1)))] == [(1, 1)] * 5
    assert [c.size for c in clip_crops(Image.new("RGB", (1, 7)))][1:] == [(1, 3), (1, 3), (1, 4), (1, 4)]


# ---------------------------------------------------------------------------- DETR mask


def test_detr_object_mask_rule():
    logits = torch.zeros(4, 100, 92)
    logits[..., -1] = 5.0  # every query says no-object ...
    logits[0, [3, 7], 10] = 6.0  # ... except two real objects in meme 0
    logits[1, [10, 20, 30, 40, 50], [1, 2, 3, 4, 5]] = torch.tensor([1.0, 4.0, 3.0, 2.0, 0.5])  # meme 1: none
    logits[2, 5, 7] = 5.0  # meme 2: a tie between a real class and no-object keeps the query
    # meme 3: all no-object, all real-class probabilities equal -> lowest query indices win
    mask = detr_object_mask(logits)
    assert mask.dtype == torch.bool and mask.shape == (4, 100)
    assert mask[0].nonzero().flatten().tolist() == [3, 7]  # no fallback once something is kept
    assert mask[1].nonzero().flatten().tolist() == [10, 20, 30, 40]  # top 4 of the real-class softmax
    assert mask[2].nonzero().flatten().tolist() == [5]
    assert mask[3].nonzero().flatten().tolist() == [0, 1, 2, 3]
    assert detr_object_mask(logits.half(), fallback_topk=2)[1].nonzero().flatten().tolist() == [20, 30]


def test_detr_object_mask_ignores_no_object_in_fallback():
    # query 0 has the highest no-object-free real-class peak only once no-object is ignored
    logits = torch.full((1, 100, 92), 0.0)
    logits[0, :, -1] = 10.0
    logits[0, 0, :-1] = -5.0
    logits[0, 0, 3] = 2.0  # sharp peak among real classes, although its raw logits are low
    assert detr_object_mask(logits, fallback_topk=1)[0].nonzero().flatten().tolist() == [0]


# ---------------------------------------------------------------------------- demo backbones


@pytest.mark.smoke
def test_demo_backbone_shapes_and_dtypes(backbones):
    clip, detr, text = backbones["clip"], backbones["detr"], backbones["text"]
    images = [_quadrant_image(40, 30), Image.new("RGB", (1, 1))]
    assert clip.encode(images).shape == (2, 5, clip.dim) and clip.dim == 96
    embeds, logits = detr.encode(images)
    assert embeds.shape == (2, 100, 64) and logits.shape == (2, 100, 92) and embeds.dtype == torch.float32
    ids, mask, hidden = text.encode(["Hello WORLD", "x " * 500])
    assert hidden.shape[-1] == 384 and hidden.shape[:2] == ids.shape and mask.dtype == torch.bool
    assert mask.sum(1).tolist() == [4, 120]  # [CLS] hello world [SEP]; truncated to 120
    assert ids[0, 0] == text.tokenizer.cls_token_id and ids[1, 119] == text.tokenizer.sep_token_id
    assert torch.equal(text.encode(["hello world"])[0], ids[:1, :4])  # lower-cased
    assert type(text.model).__name__ == "BertModel" and not text.model.training
    assert not any(p.requires_grad for p in text.model.parameters())


def test_demo_weights_are_seeded_and_leave_the_global_rng_alone(demo):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a, b = load_clip(demo, "cpu"), load_clip(demo, "cpu")
    d1, d2 = load_detr(demo, "cpu"), load_detr(demo, "cpu")
    assert torch.equal(torch.rand(3), expected)
    for m1, m2 in ((a.model, b.model), (d1.model, d2.model)):
        s1, s2 = m1.state_dict(), m2.state_dict()
        assert s1.keys() == s2.keys() and all(torch.equal(s1[k], s2[k]) for k in s1)
    other = load_clip(get_profile("demo", init_seed=1), "cpu")
    assert not torch.equal(other.model.visual.conv1.weight, a.model.visual.conv1.weight)


def test_unreachable_paper_weights_give_one_clear_error():
    code = """
import sys
from mamikit.backbones import load_clip, load_detr, load_text
from mamikit.profiles import get_profile
from mamikit.utils import MamikitError, open_image_rgb
p = get_profile("demo", clip_model="RN50x4", clip_pretrained="openai", detr_model="mamikit-bogus/detr",
                text_model="mamikit-bogus/bert")
for fn in (load_clip, load_detr, load_text):
    try:
        fn(p, "cpu")
        print("loaded?!")
    except MamikitError as exc:
        print(exc)
"""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               PYTHONPATH=str(Path(mamikit.__file__).parent.parent))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    lines = [line for line in out.stdout.splitlines() if line]
    assert len(lines) == 3, out.stdout + out.stderr
    assert "RN50x4" in lines[0] and "--clip-pretrained /path/to/RN50x4.pt" in lines[0]
    assert "mamikit-bogus/detr" in lines[1] and "--detr-model" in lines[1]
    assert "mamikit-bogus/bert" in lines[2] and "--text-model" in lines[2]


def test_local_path_that_does_not_exist(demo):
    with pytest.raises(MamikitError, match="not found"):
        load_text(get_profile("demo", text_model="/nonexistent/bert"), "cpu")
    with pytest.raises(MamikitError, match="not found"):
        load_clip(get_profile("demo", clip_model="RN50x4", clip_pretrained="/nonexistent/RN50x4.pt"), "cpu")


@pytest.mark.slow
@slow
def test_paper_backbones_dims():
    paper = get_profile("paper")
    bbs = load_backbones(paper, device="cpu")
    assert (bbs["clip"].dim, bbs["detr"].dim, bbs["text"].dim) == (640, 256, 768)
    embeds, logits = bbs["detr"].encode([_quadrant_image(64, 48)])
    assert embeds.shape == (1, 100, 256) and logits.shape == (1, 100, 92)


def test_loading_hides_transformers_bars_but_not_the_hubs_downloads():
    from huggingface_hub.utils import are_progress_bars_disabled
    from transformers.utils import logging as hf_logging

    from mamikit.backbones import _quiet_hub

    assert hf_logging.is_progress_bar_enabled() and not are_progress_bars_disabled()
    with _quiet_hub():
        assert not hf_logging.is_progress_bar_enabled()  # "Loading weights": extraction shows its own bar
        assert not are_progress_bars_disabled()  # a first `paper` load shows its downloads
    assert hf_logging.is_progress_bar_enabled() and not are_progress_bars_disabled()
