"""Tests for mamikit.backbones and mamikit.features (section 3.1 tokens, feature store)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from mamikit import features as F
from mamikit.profiles import get_profile
from mamikit.utils import MamikitError, open_image_rgb

slow = pytest.mark.skipif(os.environ.get("MAMIKIT_SLOW") != "1", reason="downloads pretrained weights; set MAMIKIT_SLOW=1")

QUADRANTS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]  # TL, TR, BL, BR


def _quadrant_image(w: int, h: int, seed: int = 0) -> Image.Image:
    """An image whose 2x2 quadrants have the QUADRANTS colours (plus a little seeded noise)."""
    arr = np.zeros((h, w, 3), np.uint8)
    arr[: h // 2, : w // 2], arr[: h // 2, w // 2 :] = QUADRANTS[0], QUADRANTS[1]
    arr[h // 2 :, : w // 2], arr[h // 2 :, w // 2 :] = QUADRANTS[2], QUADRANTS[3]
    noise = np.random.default_rng(seed).integers(0, 40, arr.shape)
    return Image.fromarray(np.clip(arr.astype(int) - noise, 0, 255).astype(np.uint8))


def _write_memes(folder: Path, n: int = 6, broken: bool = True) -> pd.DataFrame:
    """Small memes: quadrant images, odd-but-valid images, and (optionally) broken files."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        path = folder / f"{i:03d}.png"
        _quadrant_image(24 + 4 * i, 20 + 2 * i, seed=i).save(path)
        rows.append({"id": f"{i:03d}.png", "image": str(path), "text": f"Meme {i} SAYS " + "word " * i})
    odd = {
        "gray.png": _quadrant_image(20, 16).convert("L"),
        "cmyk.jpg": _quadrant_image(20, 16).convert("CMYK"),
        "rgba.png": _quadrant_image(20, 16).convert("RGBA"),
        "pal.png": _quadrant_image(20, 16).convert("P"),
        "pixel.png": Image.new("RGB", (1, 1), (9, 9, 9)),
    }
    for name, im in odd.items():
        im.save(folder / name)
        rows.append({"id": name, "image": str(folder / name), "text": name})
    _quadrant_image(20, 16).save(folder / "png_named.jpg", format="PNG")  # extension lies
    rows.append({"id": "png_named.jpg", "image": str(folder / "png_named.jpg"), "text": "a png"})
    if broken:
        (folder / "empty.jpg").write_bytes(b"")
        (folder / "text.jpg").write_bytes(b"hello, not an image")
        buf = folder / "trunc.png"
        _quadrant_image(64, 64).save(buf)
        buf.write_bytes(buf.read_bytes()[:200])
        for name in ("empty.jpg", "text.jpg", "trunc.png", "missing.jpg"):
            rows.append({"id": name, "image": str(folder / name), "text": "broken " + name})
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def demo():
    return get_profile("demo")


@pytest.fixture(scope="module")
def backbones(demo):
    return F.load_backbones(demo, device="cpu")


@pytest.fixture(scope="module")
def memes(tmp_path_factory):
    df = _write_memes(tmp_path_factory.mktemp("memes"))
    return {"MAMI": {"train": df.iloc[2:].reset_index(drop=True), "dev": df.iloc[:2].reset_index(drop=True)}}


@pytest.fixture(scope="module")
def store(tmp_path_factory, memes, demo):
    root = tmp_path_factory.mktemp("store")
    summary = F.extract_frames(memes, root, demo, batch_size=3, device="cpu", chunk_rows=4, progress=False)
    return root, summary


# ---------------------------------------------------------------------------- crops


def test_clip_crops_geometry_and_row_major_order():
    crops = F.clip_crops(_quadrant_image(300, 200))
    assert [c.size for c in crops] == [(300, 200)] + [(150, 100)] * 4
    centres = [np.asarray(c)[c.size[1] // 2, c.size[0] // 2].astype(int) for c in crops[1:]]
    for centre, colour in zip(centres, QUADRANTS):
        assert np.abs(centre - colour).max() <= 40  # noise is at most 40


def test_clip_crops_odd_sizes_cover_the_image():
    im = _quadrant_image(301, 201)
    sizes = [c.size for c in F.clip_crops(im)[1:]]
    assert sizes == [(150, 100), (151, 100), (150, 101), (151, 101)]  # extra pixel right / bottom
    arr = np.asarray(im)
    bottom = np.concatenate([np.asarray(c) for c in F.clip_crops(im)[3:]], axis=1)
    assert np.array_equal(bottom, arr[100:])  # the slices tile the image without overlap
    assert [c.size for c in F.clip_crops(Image.new("RGB", (1, 1)))] == [(1, 1)] * 5
    assert [c.size for c in F.clip_crops(Image.new("RGB", (1, 7)))][1:] == [(1, 3), (1, 3), (1, 4), (1, 4)]


# ---------------------------------------------------------------------------- DETR mask


def test_detr_object_mask_rule():
    logits = torch.zeros(4, 100, 92)
    logits[..., -1] = 5.0  # every query says no-object ...
    logits[0, [3, 7], 10] = 6.0  # ... except two real objects in meme 0
    logits[1, [10, 20, 30, 40, 50], [1, 2, 3, 4, 5]] = torch.tensor([1.0, 4.0, 3.0, 2.0, 0.5])  # meme 1: none
    logits[2, 5, 7] = 5.0  # meme 2: a tie between a real class and no-object keeps the query
    # meme 3: all no-object, all real-class probabilities equal -> lowest query indices win
    mask = F.detr_object_mask(logits)
    assert mask.dtype == torch.bool and mask.shape == (4, 100)
    assert mask[0].nonzero().flatten().tolist() == [3, 7]  # no fallback once something is kept
    assert mask[1].nonzero().flatten().tolist() == [10, 20, 30, 40]  # top 4 of the real-class softmax
    assert mask[2].nonzero().flatten().tolist() == [5]
    assert mask[3].nonzero().flatten().tolist() == [0, 1, 2, 3]
    assert F.detr_object_mask(logits.half(), fallback_topk=2)[1].nonzero().flatten().tolist() == [20, 30]


def test_detr_object_mask_ignores_no_object_in_fallback():
    # query 0 has the highest no-object-free real-class peak only once no-object is ignored
    logits = torch.full((1, 100, 92), 0.0)
    logits[0, :, -1] = 10.0
    logits[0, 0, :-1] = -5.0
    logits[0, 0, 3] = 2.0  # sharp peak among real classes, although its raw logits are low
    assert F.detr_object_mask(logits, fallback_topk=1)[0].nonzero().flatten().tolist() == [0]


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
    a, b = F.load_clip(demo, "cpu"), F.load_clip(demo, "cpu")
    d1, d2 = F.load_detr(demo, "cpu"), F.load_detr(demo, "cpu")
    assert torch.equal(torch.rand(3), expected)
    for m1, m2 in ((a.model, b.model), (d1.model, d2.model)):
        s1, s2 = m1.state_dict(), m2.state_dict()
        assert s1.keys() == s2.keys() and all(torch.equal(s1[k], s2[k]) for k in s1)
    other = F.load_clip(get_profile("demo", init_seed=1), "cpu")
    assert not torch.equal(other.model.visual.conv1.weight, a.model.visual.conv1.weight)


def test_unreachable_paper_weights_give_one_clear_error():
    code = """
import sys
from mamikit.features import load_clip, load_detr, load_text
from mamikit.profiles import get_profile
from mamikit.utils import MamikitError, open_image_rgb
p = get_profile("demo", clip_model="RN50x4", clip_pretrained="openai", detr_model="mamikit-bogus/detr", text_model="mamikit-bogus/bert")
for fn in (load_clip, load_detr, load_text):
    try:
        fn(p, "cpu")
        print("loaded?!")
    except MamikitError as exc:
        print(exc)
"""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONPATH=str(Path(F.__file__).parent.parent))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    lines = [line for line in out.stdout.splitlines() if line]
    assert len(lines) == 3, out.stdout + out.stderr
    assert "RN50x4" in lines[0] and "--clip-pretrained /path/to/RN50x4.pt" in lines[0]
    assert "mamikit-bogus/detr" in lines[1] and "--detr-model" in lines[1]
    assert "mamikit-bogus/bert" in lines[2] and "--text-model" in lines[2]


def test_local_path_that_does_not_exist(demo):
    with pytest.raises(MamikitError, match="not found"):
        F.load_text(get_profile("demo", text_model="/nonexistent/bert"), "cpu")
    with pytest.raises(MamikitError, match="not found"):
        F.load_clip(get_profile("demo", clip_model="RN50x4", clip_pretrained="/nonexistent/RN50x4.pt"), "cpu")


@pytest.mark.slow
@slow
def test_paper_backbones_dims():
    paper = get_profile("paper")
    bbs = F.load_backbones(paper, device="cpu")
    assert (bbs["clip"].dim, bbs["detr"].dim, bbs["text"].dim) == (640, 256, 768)
    embeds, logits = bbs["detr"].encode([_quadrant_image(64, 48)])
    assert embeds.shape == (1, 100, 256) and logits.shape == (1, 100, 92)


# ---------------------------------------------------------------------------- store


@pytest.mark.smoke
def test_store_round_trip_matches_a_direct_forward_pass(store, memes, backbones):
    root, summary = store
    fs = F.FeatureStore(root)
    assert fs.dims == {"clip": 96, "detr": 64, "text": 384} and fs.profile_name == "demo"
    train = memes["MAMI"]["train"]
    good = train[~train["id"].isin(["empty.jpg", "text.jpg", "trunc.png", "missing.jpg"])].sort_values("id")
    f = fs.load("MAMI", "train")
    assert f.ids == sorted(good["id"]) and len(f) == len(good)
    images = [open_image_rgb(p) for p in good["image"]]
    clip = backbones["clip"].encode(images)
    embeds, logits = backbones["detr"].encode(images)
    assert f.clip.dtype == torch.float16 and f.clip.shape == (len(good), 5, 96)
    torch.testing.assert_close(f.clip.float(), clip, atol=2e-2, rtol=2e-3)
    torch.testing.assert_close(f.detr.float(), embeds, atol=2e-2, rtol=2e-3)
    torch.testing.assert_close(f.detr_logits.float(), logits, atol=2e-2, rtol=2e-3)
    assert torch.equal(f.detr_mask, F.detr_object_mask(logits)) and f.detr_mask.dtype == torch.bool
    ids, mask, hidden = backbones["text"].encode(good["text"].tolist())
    assert f.text_ids.dtype == torch.int32 and f.text_offsets.dtype == torch.int64
    assert torch.equal(f.text_offsets[1:] - f.text_offsets[:-1], mask.sum(1))
    assert torch.equal(f.text_ids.long(), ids[mask])
    torch.testing.assert_close(f.text_hidden.float(), hidden[mask], atol=2e-2, rtol=2e-3)
    rows = f.rows(["pixel.png", "gray.png"])
    assert [f.ids[r] for r in rows] == ["pixel.png", "gray.png"] and rows.dtype == np.int64
    with pytest.raises(KeyError, match="nope"):
        f.rows(["nope"])
    dev = fs.load("MAMI", "dev", backbones=["clip"])
    assert dev.ids == ["000.png", "001.png"] and dev.detr is None and dev.text_ids is None


def test_store_files_are_standard_safetensors(store):
    from safetensors.numpy import load_file, save_file

    root, _ = store
    loaded = load_file(str(root / "MAMI" / "train" / "detr.safetensors"))
    assert set(loaded) == {"embeds", "logits", "mask"} and loaded["mask"].dtype == np.uint8
    save_file({"a": np.arange(6, dtype=np.int64).reshape(2, 3)}, str(root / "other.safetensors"))
    arrays, _ = F.read_safetensors(root / "other.safetensors")
    assert arrays["a"].tolist() == [[0, 1, 2], [3, 4, 5]]


def test_broken_images_are_skipped_and_reported(store):
    root, summary = store
    manifest = json.loads((root / "manifest.json").read_text())
    skipped = {s["id"]: s["reason"] for s in manifest["datasets"]["MAMI"]["train"]["skipped"]}
    assert set(skipped) == {"empty.jpg", "text.jpg", "trunc.png", "missing.jpg"}
    assert "not found" in skipped["missing.jpg"] and "not an image" in skipped["text.jpg"]
    assert sorted(summary["skipped"]["MAMI/train"]) == sorted(skipped)
    for name in ("clip", "detr", "text"):  # every backbone skips the same memes
        ids = (root / "MAMI" / "train" / f"{name}.ids.txt").read_text().split()
        assert not set(ids) & set(skipped) and {"gray.png", "cmyk.jpg", "rgba.png", "pal.png", "pixel.png", "png_named.jpg"} <= set(ids)
    entry = manifest["datasets"]["MAMI"]["train"]["backbones"]["detr"]
    assert entry["complete"] and entry["rows"] == len(ids) and entry["arrays"]["logits"] == ["float16", len(ids), 100, 92]
    assert not (root / "MAMI" / "train" / ".parts").exists()


def test_skipped_memes_are_printed_once(tmp_path, demo, capsys):
    df = _write_memes(tmp_path / "m", n=1)
    F.extract_frames({"D": {"test": df}}, tmp_path / "s", demo, backbones="clip,detr", device="cpu", progress=False)
    err = capsys.readouterr().err
    assert err.count("skipped D/test text.jpg") == 1 and "not an image" in err


def test_text_only_extraction_applies_the_same_skipping_rule(tmp_path, demo):
    df = _write_memes(tmp_path / "m", n=1)
    F.extract_frames({"D": {"test": df}}, tmp_path / "s", demo, backbones=("text",), device="cpu", progress=False)
    f = F.FeatureStore(tmp_path / "s").load("D", "test")
    assert "trunc.png" not in f.ids and "pixel.png" in f.ids and f.clip is None


def test_complete_store_rerun_is_fast_and_loads_no_backbone(store, memes, demo, monkeypatch):
    root, _ = store

    def _boom(*args, **kwargs):
        raise AssertionError("a backbone was loaded on a complete store")

    monkeypatch.setattr(F, "LOADERS", {"clip": _boom, "detr": _boom, "text": _boom})
    start = time.time()
    summary = F.extract_frames(memes, root, demo, batch_size=3, device="cpu", chunk_rows=4, progress=False)
    assert time.time() - start < 1.0
    assert summary["written"] == [] and len(summary["already_complete"]) == 6


def test_resume_after_interruption_gives_the_same_arrays(tmp_path, memes, demo, store):
    calls = []

    def _crash_after_two(name, dataset, split, k):
        calls.append((name, dataset, split, k))
        if name == "detr" and split == "train" and k == 1:
            raise KeyboardInterrupt  # as if killed after the second chunk of detr on MAMI/train

    root = tmp_path / "store"
    with pytest.raises(KeyboardInterrupt):
        F.extract_frames(memes, root, demo, batch_size=3, device="cpu", chunk_rows=4, progress=False, on_chunk=_crash_after_two)
    parts = sorted(p.name for p in (root / "MAMI" / "train" / ".parts").iterdir())
    assert parts == ["detr-00000.safetensors", "detr-00001.safetensors"]
    fs = F.FeatureStore(root)  # an interrupted store still loads what is complete ...
    assert fs.load("MAMI", "train", ["clip"]).clip.shape[0] == 10
    with pytest.raises(MamikitError, match="not complete"):  # ... and refuses what is not
        fs.load("MAMI", "train", ["detr"])

    calls.clear()
    F.extract_frames(memes, root, demo, batch_size=3, device="cpu", chunk_rows=4, progress=False, on_chunk=lambda *a: calls.append(a))
    n_chunks = -(-len(memes["MAMI"]["train"]) // 4)
    assert ("detr", "MAMI", "train", 0) not in calls and ("detr", "MAMI", "train", 1) not in calls
    assert [c for c in calls if c[0] == "detr" and c[2] == "train"] == [("detr", "MAMI", "train", k) for k in range(2, n_chunks)]
    assert not any(c[0] == "clip" for c in calls)  # clip was complete: not recomputed
    resumed, reference = F.FeatureStore(root).load("MAMI", "train"), F.FeatureStore(store[0]).load("MAMI", "train")
    assert resumed.ids == reference.ids
    for field in ("clip", "detr", "detr_logits", "detr_mask", "text_ids", "text_hidden", "text_offsets"):
        assert torch.equal(getattr(resumed, field), getattr(reference, field)), field


def test_truncated_or_inconsistent_files_are_named(tmp_path, store):
    import shutil

    root = tmp_path / "copy"
    shutil.copytree(store[0], root)
    path = root / "MAMI" / "train" / "clip.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(MamikitError, match=r"clip\.safetensors: truncated"):
        F.FeatureStore(root).load("MAMI", "train")
    path.write_bytes(data)
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["datasets"]["MAMI"]["train"]["backbones"]["text"]["rows"] += 1
    (root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(MamikitError, match=r"text\.safetensors: .* the manifest says"):
        F.FeatureStore(root).load("MAMI", "train")
    with pytest.raises(MamikitError, match="not a feature store"):
        F.FeatureStore(tmp_path)


def test_store_refuses_other_settings(store, memes, demo):
    root, _ = store
    with pytest.raises(MamikitError, match="split_seed"):
        F.extract_frames(memes, root, demo, device="cpu", split_seed=3, progress=False)
    with pytest.raises(MamikitError, match="clip features come from"):
        F.extract_frames(memes, root, get_profile("demo", clip_model="ViT-B-32"), device="cpu", progress=False)


def test_second_extract_waits_for_the_lock(tmp_path, demo, monkeypatch, capsys):
    from filelock import FileLock

    monkeypatch.setattr(F, "LOCK_POLL_S", 0.05)
    (tmp_path / "s").mkdir()
    lock = FileLock(str(tmp_path / "s" / ".lock"))
    lock.acquire()
    done = []
    worker = threading.Thread(target=lambda: done.append(F.extract_frames({}, tmp_path / "s", demo, progress=False)))
    worker.start()
    time.sleep(0.3)
    assert not done
    lock.release()
    worker.join(timeout=30)
    assert done and "another extract" in capsys.readouterr().err


def test_cli_extract_on_synthetic_data(tmp_path):
    from mamikit import synthetic
    from mamikit.cli import main

    synthetic.generate(tmp_path / "data", seed=3, n_mami=12, n_mami_test=4, n_fbhm=6, progress=False)
    args = ["extract", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "store"), "--device", "cpu",
            "--backbones", "clip,text", "--batch-size", "4"]
    assert main(args) == 0
    fs = F.FeatureStore(tmp_path / "store")
    assert {s for _, s in fs.splits()} == {"train", "dev", "test"}
    f = fs.load("MAMI", "train")
    assert f.detr is None and f.clip.shape[0] == len(f.ids) == f.text_offsets.shape[0] - 1 > 0
    assert main(args[:-4] + ["--dtype", "float32"]) == 2  # a store holds one dtype
