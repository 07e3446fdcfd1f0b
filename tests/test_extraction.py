"""Tests for mamikit.extraction (section 3.1 backbones run once into the section 4 feature store)."""

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

from mamikit.backbones import detr_object_mask
from mamikit.extraction import extract_frames
from mamikit.profiles import get_profile
from mamikit.store import FeatureStore
from mamikit.utils import MamikitError, open_image_rgb

import mamikit.extraction as extract_module  # noqa: E402


def _image(w: int, h: int, seed: int = 0) -> Image.Image:
    """A seeded random RGB image."""
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _write_memes(folder: Path, n: int = 6, broken: bool = True) -> pd.DataFrame:
    """Small memes: seeded random images, odd-but-valid images, and (optionally) broken files."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        path = folder / f"{i:03d}.png"
        _image(24 + 4 * i, 20 + 2 * i, seed=i).save(path)
        rows.append({"id": f"{i:03d}.png", "image": str(path), "text": f"Meme {i} SAYS " + "word " * i})
    odd = {
        "gray.png": _image(20, 16).convert("L"),
        "cmyk.jpg": _image(20, 16).convert("CMYK"),
        "rgba.png": _image(20, 16).convert("RGBA"),
        "pal.png": _image(20, 16).convert("P"),
        "pixel.png": Image.new("RGB", (1, 1), (9, 9, 9)),
    }
    for name, im in odd.items():
        im.save(folder / name)
        rows.append({"id": name, "image": str(folder / name), "text": name})
    _image(20, 16).save(folder / "png_named.jpg", format="PNG")  # extension lies
    rows.append({"id": "png_named.jpg", "image": str(folder / "png_named.jpg"), "text": "a png"})
    if broken:
        (folder / "empty.jpg").write_bytes(b"")
        (folder / "text.jpg").write_bytes(b"hello, not an image")
        buf = folder / "trunc.png"
        _image(64, 64).save(buf)
        buf.write_bytes(buf.read_bytes()[:200])
        for name in ("empty.jpg", "text.jpg", "trunc.png", "missing.jpg"):
            rows.append({"id": name, "image": str(folder / name), "text": "broken " + name})
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def memes(tmp_path_factory):
    df = _write_memes(tmp_path_factory.mktemp("memes"))
    return {"MAMI": {"train": df.iloc[2:].reset_index(drop=True), "dev": df.iloc[:2].reset_index(drop=True)}}


@pytest.fixture(scope="module")
def store(tmp_path_factory, memes, demo):
    root = tmp_path_factory.mktemp("store")
    summary = extract_frames(memes, root, demo, batch_size=3, device="cpu", chunk_rows=4, progress=False)
    return root, summary


# ---------------------------------------------------------------------------- extraction


@pytest.mark.smoke
def test_store_round_trip_matches_a_direct_forward_pass(store, memes, backbones):
    root, summary = store
    fs = FeatureStore(root)
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
    assert torch.equal(f.detr_mask, detr_object_mask(logits)) and f.detr_mask.dtype == torch.bool
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


def test_broken_images_are_skipped_and_reported(store):
    root, summary = store
    manifest = FeatureStore(root).manifest
    skipped = {s["id"]: s["reason"] for s in manifest["datasets"]["MAMI"]["train"]["skipped"]}
    assert set(skipped) == {"empty.jpg", "text.jpg", "trunc.png", "missing.jpg"}
    assert "not found" in skipped["missing.jpg"] and "not an image" in skipped["text.jpg"]
    assert sorted(summary["skipped"]["MAMI/train"]) == sorted(skipped)
    for name in ("clip", "detr", "text"):  # every backbone skips the same memes
        ids = (root / "MAMI" / "train" / f"{name}.ids.txt").read_text().split()
        assert not set(ids) & set(skipped) and {"gray.png", "cmyk.jpg", "rgba.png", "pal.png", "pixel.png",
                                                "png_named.jpg"} <= set(ids)
    entry = manifest["datasets"]["MAMI"]["train"]["backbones"]["detr"]
    assert (entry["complete"] and entry["rows"] == len(ids)
            and entry["arrays"]["logits"] == ["float16", len(ids), 100, 92])
    assert not (root / "MAMI" / "train" / ".parts").exists()


def test_skipped_memes_are_printed_once(tmp_path, demo, capsys):
    df = _write_memes(tmp_path / "m", n=1)
    extract_frames({"D": {"test": df}}, tmp_path / "s", demo, backbones="clip,detr", device="cpu", progress=False)
    err = capsys.readouterr().err
    assert err.count("skipped D/test text.jpg") == 1 and "not an image" in err


def test_text_only_extraction_applies_the_same_skipping_rule(tmp_path, demo):
    df = _write_memes(tmp_path / "m", n=1)
    extract_frames({"D": {"test": df}}, tmp_path / "s", demo, backbones=("text",), device="cpu", progress=False)
    f = FeatureStore(tmp_path / "s").load("D", "test")
    assert "trunc.png" not in f.ids and "pixel.png" in f.ids and f.clip is None


def test_complete_store_rerun_is_fast_and_loads_no_backbone(store, memes, demo, monkeypatch):
    root, _ = store

    def _boom(*args, **kwargs):
        raise AssertionError("a backbone was loaded on a complete store")

    monkeypatch.setattr(extract_module, "LOADERS", {"clip": _boom, "detr": _boom, "text": _boom})
    start = time.time()
    summary = extract_frames(memes, root, demo, batch_size=3, device="cpu", chunk_rows=4, progress=False)
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
        extract_frames(memes, root, demo, batch_size=3, device="cpu", chunk_rows=4, progress=False,
                       on_chunk=_crash_after_two)
    parts = sorted(p.name for p in (root / "MAMI" / "train" / ".parts").iterdir())
    assert parts == ["detr-00000.safetensors", "detr-00001.safetensors"]
    fs = FeatureStore(root)  # an interrupted store still loads what is complete ...
    assert fs.load("MAMI", "train", ["clip"]).clip.shape[0] == 10
    with pytest.raises(MamikitError, match="not complete"):  # ... and refuses what is not
        fs.load("MAMI", "train", ["detr"])

    calls.clear()
    extract_frames(memes, root, demo, batch_size=3, device="cpu", chunk_rows=4, progress=False,
                   on_chunk=lambda *a: calls.append(a))
    n_chunks = -(-len(memes["MAMI"]["train"]) // 4)
    assert ("detr", "MAMI", "train", 0) not in calls and ("detr", "MAMI", "train", 1) not in calls
    assert ([c for c in calls if c[0] == "detr" and c[2] == "train"]
            == [("detr", "MAMI", "train", k) for k in range(2, n_chunks)])
    assert not any(c[0] == "clip" for c in calls)  # clip was complete: not recomputed
    resumed, reference = FeatureStore(root).load("MAMI", "train"), FeatureStore(store[0]).load("MAMI", "train")
    assert resumed.ids == reference.ids
    for field in ("clip", "detr", "detr_logits", "detr_mask", "text_ids", "text_hidden", "text_offsets"):
        assert torch.equal(getattr(resumed, field), getattr(reference, field)), field


def test_store_refuses_other_settings(store, memes, demo):
    root, _ = store
    with pytest.raises(MamikitError, match="split_seed"):
        extract_frames(memes, root, demo, device="cpu", split_seed=3, progress=False)
    with pytest.raises(MamikitError, match="clip features come from"):
        extract_frames(memes, root, get_profile("demo", clip_model="ViT-B-32"), device="cpu", progress=False)


def test_second_extract_waits_for_the_lock(tmp_path, demo, monkeypatch, capsys, caplog):
    from filelock import FileLock

    caplog.set_level("INFO", logger="mamikit")  # the wait is an info message; the suite runs at WARNING

    monkeypatch.setattr(extract_module, "LOCK_POLL_S", 0.05)
    (tmp_path / "s").mkdir()
    lock = FileLock(str(tmp_path / "s" / ".lock"))
    lock.acquire()
    done = []
    worker = threading.Thread(target=lambda: done.append(extract_frames({}, tmp_path / "s", demo, progress=False)))
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
    fs = FeatureStore(tmp_path / "store")
    assert {s for _, s in fs.splits()} == {"train", "dev", "test"}
    f = fs.load("MAMI", "train")
    assert f.detr is None and f.clip.shape[0] == len(f.ids) == f.text_offsets.shape[0] - 1 > 0
    assert main(args[:-4] + ["--dtype", "float32"]) == 2  # a store holds one dtype


def test_mk_extract_is_the_function_whatever_was_imported_first():
    code = """
import sys
import mamikit.extraction
import mamikit as mk
from mamikit import extract
assert mk.extract is extract is sys.modules["mamikit.extraction"].extract, mk.extract
assert mk.extract.__module__ == "mamikit.extraction" and mk.FeatureStore.__module__ == "mamikit.store"
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(Path(extract_module.__file__).parent.parent)})
    assert out.returncode == 0, out.stderr


def test_text_only_dataset_gets_text_states_only_and_resumes(tmp_path, demo):
    """HSText (tasks.json: text only): no CLIP/DETR file, no image opened, the manifest says so; a killed run
    resumes to the same arrays."""
    texts = pd.DataFrame({"id": [f"t{i}" for i in range(7)], "image": [None] * 7,
                          "text": [f"some text number {i} " + "word " * i for i in range(7)]})
    frames = {"HSText": {"train": texts}}
    calls = []

    def _crash(name, dataset, split, k):
        calls.append((name, k))
        if k == 0:
            raise KeyboardInterrupt  # killed after the first text chunk

    root = tmp_path / "store"
    with pytest.raises(KeyboardInterrupt):
        extract_frames(frames, root, demo, batch_size=3, device="cpu", chunk_rows=3, progress=False,
                       on_chunk=_crash)
    assert calls == [("text", 0)]  # text first: no image backbone ran
    calls.clear()
    summary = extract_frames(frames, root, demo, batch_size=3, device="cpu", chunk_rows=3, progress=False,
                             on_chunk=lambda name, d, s, k: calls.append((name, k)))
    assert calls == [("text", 1), ("text", 2)] and summary["written"] == ["HSText/train/text"]
    entry = json.loads((root / "manifest.json").read_text())["datasets"]["HSText"]["train"]
    assert entry["modalities"] == ["text"] and set(entry["backbones"]) == {"text"} and entry["skipped"] == []
    assert sorted(p.name for p in (root / "HSText" / "train").iterdir()) == ["text.ids.txt", "text.safetensors"]
    fs = FeatureStore(root)
    assert fs.modalities("HSText", "train") == ("text",)
    feats = fs.load("HSText", "train")
    assert feats.clip is None and feats.detr is None and len(feats) == 7
    fresh = tmp_path / "fresh"
    extract_frames(frames, fresh, demo, batch_size=3, device="cpu", chunk_rows=3, progress=False)
    assert torch.equal(feats.text_hidden, FeatureStore(fresh).load("HSText", "train").text_hidden)
    with pytest.raises(MamikitError, match="holds text only .* no clip features"):
        fs.load("HSText", "train", ["clip", "text"])


# ---------------------------------------------------------------------------- stores side by side

KW = dict(batch_size=3, device="cpu", chunk_rows=4, progress=False)


def _no_seconds(obj):
    if isinstance(obj, dict):
        return {k: _no_seconds(v) for k, v in obj.items() if k != "seconds"}
    return [_no_seconds(v) for v in obj] if isinstance(obj, list) else obj


def _manifest(root: Path) -> dict:
    return _no_seconds(json.loads((root / "manifest.json").read_text()))


def _refuse(*names):
    def _boom(profile, device):
        raise AssertionError("backbone loaded although a sibling store holds its features")

    return {n: (_boom if n in names else extract_module.LOADERS[n]) for n in extract_module.LOADERS}


def test_a_sibling_store_lends_the_backbones_it_shares(tmp_path, memes, monkeypatch, caplog):
    vit = get_profile("demo-vit-l-14")  # the demo's DETR and MiniLM, another CLIP
    lone = tmp_path / "alone" / "demo-vit-l-14"
    extract_frames(memes, lone, vit, **KW)
    root = tmp_path / "features"
    extract_frames(memes, root / "demo", get_profile("demo"), **KW)

    monkeypatch.setattr(extract_module, "LOADERS", _refuse("detr", "text"))
    with caplog.at_level("INFO", logger="mamikit.extraction"):
        summary = extract_frames(memes, root / "demo-vit-l-14", vit, **KW)
    shared = [f"MAMI/{s}/{b}" for s in ("train", "dev") for b in ("detr", "text")]
    assert sorted(summary["reused"]) == sorted(shared)
    assert sorted(summary["written"]) == ["MAMI/dev/clip", "MAMI/train/clip"]
    assert f"reused detr MAMI/train from {root / 'demo'}" in caplog.text
    got = root / "demo-vit-l-14"
    files = sorted(p.relative_to(lone) for p in lone.rglob("*") if p.is_file() and not p.name.startswith("."))
    assert files == sorted(p.relative_to(got) for p in got.rglob("*") if p.is_file() and not p.name.startswith("."))
    for rel in (f for f in files if f.name != "manifest.json"):  # the manifest's timings differ
        assert (got / rel).read_bytes() == (lone / rel).read_bytes(), rel
    linked = "MAMI/train/detr.safetensors"
    assert (got / linked).stat().st_ino == (root / "demo" / linked).stat().st_ino  # a hard link, not a copy
    assert _manifest(got) == _manifest(lone)
    assert summary["skipped"]["MAMI/train"] == ["empty.jpg", "missing.jpg", "text.jpg", "trunc.png"]
    loaded = FeatureStore(got).load("MAMI", "train")
    assert loaded.text_offsets.shape[0] == len(loaded.ids) + 1 == loaded.clip.shape[0] + 1


def test_a_sibling_of_another_dtype_or_with_a_damaged_file_is_not_reused(tmp_path, memes, demo, monkeypatch):
    root = tmp_path / "features"
    extract_frames(memes, root / "a32", demo, dtype="float32", **KW)
    assert extract_frames(memes, root / "b16", demo, **KW)["reused"] == []  # float32 files: not this store's

    victim = root / "b16/MAMI/train/detr.safetensors"
    intact = victim.read_bytes()
    victim.write_bytes(intact[:-4] + bytes(b ^ 0xFF for b in intact[-4:]))  # same size, other bytes
    calls = []
    real = extract_module.LOADERS["detr"]
    monkeypatch.setitem(extract_module.LOADERS, "detr", lambda *a: calls.append(a) or real(*a))
    monkeypatch.setitem(extract_module.LOADERS, "clip", _refuse("clip")["clip"])
    monkeypatch.setitem(extract_module.LOADERS, "text", _refuse("text")["text"])

    def _killed(name):  # as if killed once, after the first reused files are in place
        if name == "after_reuse" and not killed:
            killed.append(name)
            raise KeyboardInterrupt

    killed = []
    monkeypatch.setattr(extract_module, "fault_point", _killed)
    with pytest.raises(KeyboardInterrupt):
        extract_frames(memes, root / "c16", demo, **KW)
    summary = extract_frames(memes, root / "c16", demo, **KW)
    assert "MAMI/train/detr" in summary["written"] and len(calls) == 1
    assert sorted(summary["reused"] + summary["written"]) == sorted(
        f"MAMI/{s}/{b}" for s in ("train", "dev") for b in ("clip", "detr", "text"))
    assert (root / "c16/MAMI/train/detr.safetensors").read_bytes() == intact
    assert not list((root / "c16").rglob("*.tmp"))
    assert _manifest(root / "c16") == _manifest(root / "b16")
