"""Tests for mamikit.store (the section 4 feature store: its files, manifest and reader)."""

from __future__ import annotations

import hashlib
import json
import shutil
import struct

import numpy as np
import pytest
import torch

from mamikit.store import (
    STORE_FORMAT,
    FeatureStore,
    read_manifest,
    read_safetensors,
    store_dtype,
    write_safetensors,
    write_split,
)
from mamikit.utils import MamikitError


def _split_arrays(n: int, seed: int = 0, dtype=np.float16) -> tuple[list[str], dict]:
    """A split of n memes in the store's layout: clip, detr and ragged text arrays."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(3, 9, n)
    return [f"m{i:03d}" for i in range(n)], {
        "clip": {"embeds": rng.normal(size=(n, 5, 6)).astype(dtype)},
        "detr": {"embeds": rng.normal(size=(n, 100, 4)).astype(dtype),
                 "logits": rng.normal(size=(n, 100, 92)).astype(dtype),
                 "mask": (rng.random((n, 100)) < 0.1).astype(np.uint8)},
        "text": {"input_ids": rng.integers(0, 500, lengths.sum()).astype(np.int32),
                 "hidden": rng.normal(size=(lengths.sum(), 8)).astype(dtype),
                 "offsets": np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)},
    }


@pytest.fixture
def store(tmp_path):
    ids, arrays = _split_arrays(7)
    write_split(tmp_path / "s", "MAMI", "train", ids, arrays, profile="demo")
    return tmp_path / "s", ids, arrays


def test_write_split_round_trip(store):
    root, ids, arrays = store
    fs = FeatureStore(root)
    assert fs.dims == {"clip": 6, "detr": 4, "text": 8} and fs.dtype == "float16" and fs.profile_name == "demo"
    assert fs.splits() == [("MAMI", "train")] and sorted(b for *_, b, _ in fs.entries()) == ["clip", "detr", "text"]
    f = fs.load("MAMI", "train")
    assert f.ids == ids and len(f) == 7
    assert np.array_equal(f.clip.numpy(), arrays["clip"]["embeds"]) and f.clip.dtype == torch.float16
    assert np.array_equal(f.detr_logits.numpy(), arrays["detr"]["logits"])
    assert torch.equal(f.detr_mask, torch.from_numpy(arrays["detr"]["mask"].astype(bool)))
    assert np.array_equal(f.text_hidden.numpy(), arrays["text"]["hidden"]) and f.text_ids.dtype == torch.int32
    assert f.text_offsets.tolist() == arrays["text"]["offsets"].tolist()
    assert f.rows(["m004", "m001"]).tolist() == [4, 1]
    with pytest.raises(KeyError, match="nope"):
        f.rows(["nope"])
    only = fs.load("MAMI", "train", backbones=["clip"])
    assert only.detr is None and only.text_ids is None and only.ids == ids
    with pytest.raises(MamikitError, match="no features for MAMI/dev .*holds MAMI/train"):
        fs.load("MAMI", "dev")


def test_a_second_split_joins_the_manifest_and_other_precisions_are_refused(store):
    root, _, _ = store
    ids, arrays = _split_arrays(3, seed=1)
    write_split(root, "FBHM", "test", ids, {"clip": arrays["clip"]})
    fs = FeatureStore(root)
    assert sorted(fs.splits()) == [("FBHM", "test"), ("MAMI", "train")]
    assert fs.load("FBHM", "test").ids == ids and fs.load("FBHM", "test").detr is None
    _, wide = _split_arrays(3, dtype=np.float32)
    with pytest.raises(MamikitError, match="holds float16 features, these are float32"):
        write_split(root, "FBHM", "dev", ids, {"clip": wide["clip"]})
    with pytest.raises(MamikitError, match="detr lacks array.* mask"):
        write_split(root, "FBHM", "dev", ids,
                    {"detr": {"embeds": arrays["detr"]["embeds"], "logits": arrays["detr"]["logits"]}})
    with pytest.raises(MamikitError, match="unknown backbone.*audio"):
        write_split(root, "FBHM", "dev", ids, {"audio": {}})


def test_file_format_is_pinned(tmp_path):
    """The bytes `extract` has always written: stores written before must keep loading."""
    embeds = np.arange(30, dtype=np.float16).reshape(2, 5, 3)
    write_split(tmp_path, "D", "test", ["a", "b"], {"clip": {"embeds": embeds}})
    header = (b'{"embeds":{"dtype":"F16","shape":[2,5,3],"data_offsets":[0,60]},"__metadata__":{"format":'
              b'"mamikit-feature-store/1","backbone":"clip","dataset":"D","split":"test","rows":"2"}}')
    header += b" " * (-len(header) % 8)
    assert ((tmp_path / "D" / "test" / "clip.safetensors").read_bytes()
            == struct.pack("<Q", len(header)) + header + embeds.tobytes())
    assert (tmp_path / "D" / "test" / "clip.ids.txt").read_text() == "a\nb\n"
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert list(manifest) == ["format", "mamikit_version", "profile", "split_seed", "dtype", "complete", "backbones",
                              "datasets"]
    assert (manifest["format"] == STORE_FORMAT and manifest["dtype"] == "float16"
            and manifest["backbones"] == {"clip": {"dim": 3}})
    entry = manifest["datasets"]["D"]["test"]["backbones"]["clip"]
    data = struct.pack("<Q", len(header)) + header + embeds.tobytes()
    assert entry == {"file": "D/test/clip.safetensors", "ids_file": "D/test/clip.ids.txt", "rows": 2,
                     "bytes": 8 + len(header) + 60, "sha256": hashlib.sha256(data).hexdigest(), "complete": True,
                     "arrays": {"embeds": ["float16", 2, 5, 3]}}  # the hash: what a local copy is checked against


def test_store_files_are_standard_safetensors(store):
    from safetensors.numpy import load_file, save_file

    root, _, arrays = store
    loaded = load_file(str(root / "MAMI" / "train" / "detr.safetensors"))
    assert set(loaded) == {"embeds", "logits", "mask"} and loaded["mask"].dtype == np.uint8
    assert np.array_equal(loaded["logits"], arrays["detr"]["logits"])
    save_file({"a": np.arange(6, dtype=np.int64).reshape(2, 3)}, str(root / "other.safetensors"))
    read, _ = read_safetensors(root / "other.safetensors")
    assert read["a"].tolist() == [[0, 1, 2], [3, 4, 5]]


def test_safetensors_pieces_are_joined_and_checked(tmp_path):
    pieces = [np.ones((2, 3), np.float32), np.zeros((0, 3), np.float32), np.full((1, 3), 2, np.float32)]
    size = write_safetensors(tmp_path / "x.safetensors", {"a": pieces}, {"k": 1})
    arrays, meta = read_safetensors(tmp_path / "x.safetensors")
    assert size == (tmp_path / "x.safetensors").stat().st_size and meta == {"k": "1"}
    assert arrays["a"].tolist() == [[1.0] * 3] * 2 + [[2.0] * 3]
    with pytest.raises(MamikitError, match="pieces of a differ"):
        write_safetensors(tmp_path / "y.safetensors", {"a": [np.ones((1, 3)), np.ones((1, 4))]})
    (tmp_path / "z.safetensors").write_bytes(b"\x10\x00")
    with pytest.raises(MamikitError, match=r"z\.safetensors: truncated"):
        read_safetensors(tmp_path / "z.safetensors")


def test_truncated_or_inconsistent_files_are_named(tmp_path, store):
    root = tmp_path / "copy"
    shutil.copytree(store[0], root)
    path = root / "MAMI" / "train" / "clip.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(MamikitError, match=r"clip\.safetensors: truncated"):
        FeatureStore(root).load("MAMI", "train")
    path.write_bytes(data)
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["datasets"]["MAMI"]["train"]["backbones"]["text"]["rows"] += 1
    (root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(MamikitError, match=r"text\.safetensors: .* the manifest says"):
        FeatureStore(root).load("MAMI", "train")
    (root / "MAMI" / "train" / "detr.ids.txt").write_text("other\n" * 7)
    with pytest.raises(MamikitError, match="hold different memes"):
        FeatureStore(root).load("MAMI", "train", ["clip", "detr"])


def test_manifest_api(tmp_path, store):
    with pytest.raises(MamikitError, match="not a feature store"):
        FeatureStore(tmp_path)
    assert read_manifest(tmp_path, missing_ok=True) is None
    (tmp_path / "manifest.json").write_text('{"format": "something-else/2"}')
    with pytest.raises(MamikitError, match="unknown store format 'something-else/2'"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("[1, 2]")
    with pytest.raises(MamikitError, match="unknown store format None"):
        read_manifest(tmp_path)
    assert store_dtype(read_manifest(store[0])) == "float16" and store_dtype({}) == "float16"


def test_the_store_records_its_tokenizers_special_ids_and_the_model_takes_them(tiny_store, tmp_path):
    """[CLS]/[SEP] come from the tokenizer the store was extracted with, never from uncased BERT's 101/102."""
    import shutil

    from mamikit.backbones import load_text
    from mamikit.experiments import experiment_tasks, get_experiment
    from mamikit.profiles import get_profile
    from mamikit.runs import build_model
    from mamikit.utils import MamikitError

    store = FeatureStore(tiny_store)
    tokenizer = load_text(get_profile("demo"), "cpu").tokenizer
    assert store.special_ids == (tokenizer.cls_token_id, tokenizer.sep_token_id)
    exp = get_experiment("00")  # the shared encoder: the model embeds its own [CLS] and [SEP]
    model = build_model(exp, get_profile("demo"), store.dims, experiment_tasks(exp), "cpu", store.special_ids)
    assert (model.cfg.cls_token_id, model.cfg.sep_token_id) == store.special_ids
    with pytest.raises(MamikitError, match=r"\[CLS\]/\[SEP\] ids \(0, 2\).*extract the store again"):
        build_model(exp, get_profile("demo"), store.dims, experiment_tasks(exp), "cpu", (0, 2))  # RoBERTa's
    # a store written before the ids were recorded: the profile's tokenizer's
    old = tmp_path / "old"
    shutil.copytree(tiny_store, old)
    manifest = json.loads((old / "manifest.json").read_text())
    for key in ("cls_token_id", "sep_token_id"):
        manifest["backbones"]["text"].pop(key)
    (old / "manifest.json").write_text(json.dumps(manifest))
    assert FeatureStore(old).special_ids is None
    model = build_model(exp, get_profile("demo"), FeatureStore(old).dims, experiment_tasks(exp), "cpu")
    assert (model.cfg.cls_token_id, model.cfg.sep_token_id) == (tokenizer.cls_token_id, tokenizer.sep_token_id)
