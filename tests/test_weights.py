"""Tests for mamikit.weights: checked loading, random paper architectures, provenance in the store."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mamikit import backbones as B
from mamikit import weights as W
from mamikit.cli import build_parser
from mamikit.extraction import extract_frames
from mamikit.profiles import get_profile, minilm_dir
from mamikit.utils import MamikitError

ROOT = Path(__file__).resolve().parent.parent
QUERY = "encoder.layer.0.attention.self.query.weight"


def _sha(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _tiny_bert(folder: Path, head: bool = True) -> Path:
    """A tiny uncased BERT saved like the hub's hatexplain model (a classifier on top), with its tokenizer."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification, BertModel

    cfg = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, num_labels=3)
    torch.manual_seed(0)
    (BertForSequenceClassification if head else BertModel)(cfg).save_pretrained(folder)
    AutoTokenizer.from_pretrained(minilm_dir()).save_pretrained(folder)
    return folder


def _edit_weights(folder: Path, edit) -> None:
    path = folder / "model.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


@pytest.fixture()
def bert_dir(tmp_path):
    return _tiny_bert(tmp_path / "bert")


@pytest.mark.smoke
def test_profile_weights_setting():
    assert get_profile("paper").weights == "pretrained"
    paper = get_profile("paper", weights="random")
    assert (paper.weights, paper.clip_model, paper.detr_model) == ("random", "RN50x4", "facebook/detr-resnet-50")
    with pytest.raises(MamikitError, match="weights must be 'pretrained' or 'random'"):
        get_profile("paper", weights="imagenet")


def test_cli_commands_take_weights(monkeypatch):
    from mamikit.settings import SETTINGS_ENV, settings_from_args

    monkeypatch.delenv(SETTINGS_ENV, raising=False)
    parser = build_parser()

    def weights(args):  # train and round read it through their settings (a settings file may name it)
        return args.weights if args.command == "extract" else settings_from_args(args).weights

    for command in (["extract", "--data", "d", "--out", "s"],
                    ["train", "--experiment", "30", "--data", "d", "--features", "s", "--out", "r"],
                    ["round", "--round", "1", "--data", "d", "--features", "s", "--out", "r"]):
        assert weights(parser.parse_args(command)) == "pretrained"
        assert weights(parser.parse_args([*command, "--weights", "random"])) == "random"
    with pytest.raises(SystemExit):
        parser.parse_args(["extract", "--data", "d", "--out", "s", "--weights", "imagenet"])


# ---------------------------------------------------------------------------- checked loading


@pytest.mark.smoke
def test_text_checkpoint_loads_without_its_classifier_and_names_its_hash(bert_dir):
    text = B.load_text(get_profile("demo", text_model=str(bert_dir)), "cpu")
    assert type(text.model).__name__ == "BertModel" and text.dim == 32
    spec = text.spec()
    assert spec["weights"] == str(bert_dir) and spec["revision"] == f"sha256:{_sha(bert_dir / 'model.safetensors')}"
    saved = load_file(str(bert_dir / "model.safetensors"))
    assert torch.equal(text.model.state_dict()[QUERY], saved[f"bert.{QUERY}"])  # really the file's weights


@pytest.mark.smoke
def test_text_checkpoint_with_a_renamed_key_is_refused(bert_dir):
    _edit_weights(bert_dir, lambda t: t.__setitem__("bert.encoder.layer.0.attention.self.qry.weight",
                                                    t.pop(f"bert.{QUERY}")))
    with pytest.raises(MamikitError) as err:
        B.load_text(get_profile("demo", text_model=str(bert_dir)), "cpu")
    msg = str(err.value)
    assert str(bert_dir) in msg and f"missing 1 key(s): {QUERY}" in msg
    # transformers 5 names the checkpoint's key, 4 the key without the model's prefix
    assert re.search(r"unexpected 1 key\(s\): (bert\.)?encoder\.layer\.0\.attention\.self\.qry\.weight", msg)
    assert "classifier" not in msg


def test_text_checkpoint_with_extra_weights_is_refused(bert_dir):
    _edit_weights(bert_dir, lambda t: t.__setitem__("bert.adapter.weight", torch.zeros(2, 2)))
    with pytest.raises(MamikitError, match=r"text model .*unexpected 1 key\(s\): (bert\.)?adapter\.weight"):
        B.load_text(get_profile("demo", text_model=str(bert_dir)), "cpu")


def test_text_checkpoint_without_pooler_loads(tmp_path):
    folder = _tiny_bert(tmp_path / "bert", head=False)
    _edit_weights(folder, lambda t: [t.pop(k) for k in list(t) if k.startswith("pooler.")])
    assert B.load_text(get_profile("demo", text_model=str(folder)), "cpu").dim == 32


def _tiny_detr_dir(folder: Path) -> Path:
    from transformers import DetrForObjectDetection, DetrImageProcessor

    torch.manual_seed(0)
    DetrForObjectDetection(W.tiny_detr_config()).save_pretrained(folder)
    DetrImageProcessor(size={"shortest_edge": 64, "longest_edge": 96}).save_pretrained(folder)
    return folder


def test_detr_checkpoint_is_checked(tmp_path):
    from PIL import Image

    folder = _tiny_detr_dir(tmp_path / "detr")
    profile = get_profile("demo", detr_model=str(folder))
    detr = B.load_detr(profile, "cpu")
    assert detr.spec()["revision"] == f"sha256:{_sha(folder / 'model.safetensors')}"
    embeds, logits = detr.encode([Image.new("RGB", (50, 40), (200, 30, 30))])
    assert embeds.shape == (1, 100, 64) and logits.shape == (1, 100, 92)
    # batch-norm counters are dropped quietly; any other stray weight is not
    counter = "model.backbone.conv_encoder.model.embedder.num_batches_tracked"
    _edit_weights(folder, lambda t: t.__setitem__(counter, torch.tensor(5)))
    B.load_detr(profile, "cpu")
    _edit_weights(folder, lambda t: t.pop("class_labels_classifier.weight"))
    with pytest.raises(MamikitError, match=r"detr model .*missing 1 key\(s\): class_labels_classifier\.weight"):
        B.load_detr(profile, "cpu")


def test_clip_checkpoint_file_is_hashed_and_checked(tmp_path):
    demo = get_profile("demo")
    state = _full_clip_state(demo)
    state["visual.conv1.weight"] += 1.0  # unlike the seeded random init
    path = tmp_path / "tiny-clip.pt"
    torch.save(state, path)
    loaded = B.load_clip(get_profile("demo", clip_pretrained=str(path)), "cpu")
    assert loaded.spec()["weights"] == str(path) and loaded.spec()["revision"] == f"sha256:{_sha(path)}"
    assert torch.equal(loaded.model.visual.conv1.weight, state["visual.conv1.weight"])
    state["visual.extra"] = torch.zeros(1)
    torch.save(state, path)
    with pytest.raises(MamikitError, match="cannot load the CLIP"):
        B.load_clip(get_profile("demo", clip_pretrained=str(path)), "cpu")


def _full_clip_state(profile) -> dict:
    """The demo CLIP's complete state dict (text tower included, as open_clip checkpoints hold it)."""
    import open_clip

    W.register_tiny_clip()
    torch.manual_seed(profile.init_seed)
    model = open_clip.create_model(profile.clip_model)
    return model.state_dict()


def test_clip_quick_gelu_follows_the_weights():
    assert W.clip_quick_gelu("RN50x4", "openai") is True  # OpenAI trained with QuickGELU
    assert W.clip_quick_gelu("RN50x4", None) is False
    assert W.clip_quick_gelu("RN50x4-quickgelu", None) is True
    assert W.clip_quick_gelu("ViT-B-32", "laion2b_s34b_b79k") is False
    assert "7e526bd135e493cef0776de27d5f42653e6b4c8bf9e0f653bb11773263205fdd" in W.clip_revision("RN50x4", "openai")


def test_hub_model_records_its_revision(tmp_path):
    """A model found in the Hugging Face cache (offline) is loaded, checked and named by its commit."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--someone--tiny-bert"
    _tiny_bert(repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    code = ("from mamikit.backbones import load_text; from mamikit.profiles import get_profile; "
            "print(load_text(get_profile('demo', text_model='someone/tiny-bert'), 'cpu').spec()['revision'])")
    env = dict(os.environ, HF_HUB_CACHE=str(tmp_path / "hub"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=180)
    assert out.stdout.strip().splitlines()[-1:] == [commit], out.stdout + out.stderr


# ---------------------------------------------------------------------------- random weights


@pytest.mark.smoke
def test_random_paper_text_model_is_bert_base_uncased():
    text = B.load_text(get_profile("paper", weights="random"), "cpu")
    cfg = text.model.config
    assert (text.dim, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.vocab_size) == (768, 12, 12, 30522)
    ids, mask, hidden = text.encode(["Hello WORLD"])
    assert text.tokenizer.convert_ids_to_tokens(ids[0].tolist()) == ["[CLS]", "hello", "world", "[SEP]"]
    assert ids[0].tolist() == [101, 7592, 2088, 102] and hidden.shape == (1, 4, 768)
    assert text.spec()["weights"] == "random (seed 0)" and text.spec()["revision"] is None
    again = B.load_text(get_profile("paper", weights="random"), "cpu")
    assert torch.equal(again.model.embeddings.word_embeddings.weight, text.model.embeddings.word_embeddings.weight)


def test_random_paper_detr_is_detr_resnet50():
    torch.manual_seed(0)
    from transformers import DetrForObjectDetection

    config = W.random_detr_config(get_profile("paper", weights="random"))
    model = DetrForObjectDetection(config)
    assert (config.num_queries, config.num_labels + 1, config.d_model) == (100, 92, 256)
    resnet = next(m for m in model.model.backbone.modules() if hasattr(m, "layer4"))  # timm's ResNet
    assert [len(getattr(resnet, f"layer{i}")) for i in range(1, 5)] == [3, 4, 6, 3]  # ResNet-50
    assert W.random_detr_processor(get_profile("paper", weights="random")).size["shortest_edge"] == 800


def test_random_weights_of_a_local_model(tmp_path):
    demo = get_profile("demo", weights="random")
    text, real = B.load_text(demo, "cpu"), B.load_text(get_profile("demo"), "cpu")
    assert text.dim == real.dim == 384 and text.spec()["weights"] == "random (seed 0)"
    assert not torch.equal(text.model.embeddings.word_embeddings.weight, real.model.embeddings.word_embeddings.weight)
    with pytest.raises(MamikitError, match="random weights for text model 'someone/bert'"):
        B.load_text(get_profile("demo", weights="random", text_model="someone/bert"), "cpu")


@pytest.mark.smoke
def test_store_records_weights_and_keeps_them_apart(tmp_path, bert_dir):
    import pandas as pd
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "img.png")
    frame = pd.DataFrame({"id": ["a", "b"], "image": [str(tmp_path / "img.png")] * 2,
                          "text": ["one meme", "two memes"]})
    store = tmp_path / "store"
    pretrained = get_profile("demo", text_model=str(bert_dir))
    extract_frames({"MAMI": {"train": frame}}, store, pretrained, backbones="text", device="cpu", progress=False)
    spec = json.loads((store / "manifest.json").read_text())["backbones"]["text"]
    assert spec["weights"] == str(bert_dir) and spec["revision"] == f"sha256:{_sha(bert_dir / 'model.safetensors')}"
    with pytest.raises(MamikitError, match="text features come from"):
        extract_frames({"MAMI": {"train": frame}}, store,
                       get_profile("demo", text_model=str(bert_dir), weights="random"),
                       backbones="text", device="cpu", progress=False)
