"""The three frozen backbones of section 3.1 (tokens embedding): CLIP, DETR, BERT.

Each wrapper holds a frozen model in eval mode and turns memes into the token
vectors the paper feeds to its encoders:

- CLIP: the whole image and its 2x2 slices, each through the model's own
  preprocessing, give 5 image embeddings (`model.encode_image`, not
  normalised: the paper projects them with a linear layer anyway).
- DETR: the 100 decoder query embeddings and their 92 logits (91 classes +
  no-object), plus the paper's object mask (:func:`detr_object_mask`).
- Text: lower-cased text, at most 120 tokens including `[CLS]`/`[SEP]`, and the
  last hidden states of the frozen encoder.

The `paper` profile loads RN50x4/openai, facebook/detr-resnet-50 and the
hatexplain BERT, and checks that every weight found its place
(:mod:`mamikit.weights`); with `weights="random"` it builds the same three
architectures with seeded random weights and downloads nothing. The other
profiles of mamikit/profiles.json load the same way. The tiny profiles
(`demo`, `demo-vit-l-14`, ...) build tiny open_clip, DETR and text models from
the registry's configs with `profile.init_seed`, so every machine gets the same
random weights without a download. Any name can be a local path instead. A
profile with detector none (`detr_model` None) has no DETR to load.

Longer than mamikit's usual module (about 500 lines): three wrappers, the demo's seeded tiny
models that stand in for them offline, and the loading checks share one file so that the
paper's and the demo's backbones are read side by side.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re

import torch

from . import weights as W
from .profiles import Profile, get_profile
from .utils import MamikitError, pick_device
from .weights import NUM_DETR_LOGITS, NUM_DETR_QUERIES  # noqa: F401  (part of this module's contract)

DETR_FALLBACK_TOPK = 4  # queries kept when DETR sees no object at all


def _seeded(seed: int):
    """Context in which torch's CPU generator is seeded, restored afterwards."""
    stack = contextlib.ExitStack()
    stack.enter_context(torch.random.fork_rng(devices=[]))
    torch.manual_seed(seed)
    return stack


def _freeze(model: torch.nn.Module, device) -> torch.nn.Module:
    model.requires_grad_(False)
    return model.eval().to(device)


@contextlib.contextmanager
def _quiet_hub():
    """Hide transformers' per-file "Loading weights" bars (extraction shows its own).

    The hub's download bars stay on: a first `paper` load fetches about a gigabyte.
    """
    from huggingface_hub.utils import are_progress_bars_disabled, enable_progress_bars
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    downloads_shown = not are_progress_bars_disabled()
    hf_logging.disable_progress_bar()  # transformers' own bars and the hub's
    if downloads_shown:
        enable_progress_bars()  # the hub's again
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _load_error(kind: str, name: str, option: str, exc: BaseException, example: str) -> MamikitError:
    """One message for a backbone that cannot be loaded, saying how to give a local copy."""
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return MamikitError(
        f"cannot load the {kind} model {name!r} ({reason[:300]}). If the Hugging Face hub is "
        f"unreachable, download it on a machine with network and point mamikit at the local copy "
        f"with {option} {example}"
    )


# ---------------------------------------------------------------------------- CLIP


def clip_crops(image) -> list:
    """Return the whole image and its 2x2 slices, row-major: [whole, TL, TR, BL, BR].

    Slices are cut from the original image: a 300x200 image gives four 150x100
    slices. With an odd side the right column / bottom row gets the extra pixel
    (301 wide: 150 + 151); a side of 1 pixel is shared by both halves, so a
    1x1 image gives five 1x1 crops.
    """
    w, h = image.size
    xs = ((0, max(w // 2, 1)), (min(w // 2, w - 1), w))
    ys = ((0, max(h // 2, 1)), (min(h // 2, h - 1), h))
    crops = [image]
    for y0, y1 in ys:
        for x0, x1 in xs:
            crops.append(image.crop((x0, y0, x1, y1)))
    return crops


class ClipBackbone:
    """Frozen open_clip image tower: 5 embeddings per meme (whole image + 2x2 slices)."""

    name = "clip"

    def __init__(self, model, preprocess, model_name: str, pretrained: str | None, device,
                 revision: str | None = None):
        self.model = model
        self.preprocess = preprocess  # the model's own eval transform (resize, centre crop, normalise)
        self.model_name = model_name
        self.pretrained = pretrained  # weights tag, checkpoint file, "random (seed N)" or None (demo)
        self.revision = revision  # the tag's download address or "sha256:..." of the file
        self.device = torch.device(device)
        with torch.inference_mode():
            size = _image_size(preprocess)
            probe = torch.zeros(1, 3, size, size, device=self.device)
            self.dim = int(model.encode_image(probe).shape[-1])

    def spec(self) -> dict:
        """What the store records about this backbone."""
        return {
            "model": self.model_name,
            "weights": self.pretrained,
            "revision": self.revision,
            "dim": self.dim,
            "preprocessing": f"whole image + 2x2 slices (row-major), each through {_describe(self.preprocess)}",
            "output": "model.encode_image, not normalised",
            "arrays": {"embeds": f"(N, 5, {self.dim})"},
        }

    def prepare(self, image) -> torch.Tensor:
        """Crops of one RGB image through the preprocessing: (5, 3, S, S)."""
        return torch.stack([self.preprocess(c) for c in clip_crops(image)])

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """Embed prepared crops (B, 5, 3, S, S) -> (B, 5, D) float32."""
        b = pixels.shape[0]
        flat = pixels.to(self.device, non_blocking=True).flatten(0, 1)  # (B*5, 3, S, S)
        return self.model.encode_image(flat).float().reshape(b, 5, -1)

    @torch.inference_mode()
    def encode(self, images: list) -> torch.Tensor:
        """Embed RGB PIL images -> (N, 5, D) float32 on the CPU."""
        if not images:
            return torch.zeros(0, 5, self.dim)
        return self.forward(torch.stack([self.prepare(im) for im in images])).cpu()


def _image_size(preprocess) -> int:
    for t in getattr(preprocess, "transforms", []):
        size = getattr(t, "size", None)
        if size is not None:
            return int(size[0] if isinstance(size, (tuple, list)) else size)
    return 224


def _describe(preprocess) -> str:
    text = " -> ".join(repr(t).replace("\n", " ") for t in getattr(preprocess, "transforms", [preprocess]))
    return re.sub(r" at 0x[0-9a-fA-F]+", "", text)  # older open_clip transforms are functions: no address in the store


def load_clip(profile: Profile, device="auto") -> ClipBackbone:
    """Load the profile's CLIP image tower, frozen and in eval mode.

    Args:
        profile: `profile.clip_model` is an open_clip architecture name;
            `profile.clip_pretrained` a weights tag, a local checkpoint file, or
            None for a random init seeded with `profile.init_seed` (as is
            every model with `profile.weights == "random"`).
        device: "auto", "cpu", "cuda" or a torch.device.
    Returns:
        A ClipBackbone with `.encode(images) -> (N, 5, D)` and `.dim`.
    """
    import open_clip

    device = pick_device(device) if isinstance(device, (str, type(None))) else device
    name, tag = profile.clip_model, profile.clip_pretrained
    pretrained = tag if profile.weights == "pretrained" else None
    if W.is_tiny("clip", name):
        W.register_tiny_clip(name)
    if pretrained and os.path.sep in pretrained and not os.path.isfile(pretrained):
        raise MamikitError(f"CLIP checkpoint {pretrained} not found (given as --clip-pretrained)")
    root = logging.getLogger()
    level = root.level
    try:
        root.setLevel(logging.ERROR)  # open_clip warns on purpose-made random inits
        quick_gelu = W.clip_quick_gelu(name, tag)  # the activation the named weights were trained with
        with _seeded(profile.init_seed):
            model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=pretrained or None,
                                                                         force_quick_gelu=quick_gelu)
        revision = W.clip_revision(name, pretrained)
    except MamikitError:
        raise
    except Exception as exc:
        raise _load_error(
            f"CLIP ({name}, weights {pretrained})", name, "--clip-pretrained", exc,
            f"/path/to/{name}.pt (or --clip-model for another open_clip architecture)",
        ) from None
    finally:
        root.setLevel(level)
    # Only the image tower is needed; dropping the text tower saves memory.
    for attr in ("transformer", "token_embedding", "ln_final", "text"):
        if hasattr(model, attr):
            setattr(model, attr, None)
    return ClipBackbone(_freeze(model, device), preprocess, name, W.provenance(profile, "clip"), device, revision)


# ---------------------------------------------------------------------------- DETR


def detr_object_mask(logits: torch.Tensor, fallback_topk: int = DETR_FALLBACK_TOPK) -> torch.Tensor:
    """Return the object mask of section 3.1: (N, Q, C+1) logits -> (N, Q) bool, True = keep.

    A query is kept when the arg-max of its softmax is a real class, not the
    no-object class (the last index). A tie between the best real class and
    no-object keeps the query. A meme that keeps no query at all keeps instead
    the `fallback_topk` queries with the highest probability under a softmax over
    the real classes only (no-object logit ignored); equal probabilities go to
    the lower query index.
    """
    if logits.dim() != 3 or logits.shape[-1] < 2:
        raise MamikitError(f"DETR logits must be (N, Q, classes + 1), got {tuple(logits.shape)}")
    logits = logits.float()
    probs = logits.softmax(-1)  # (N, Q, C+1)
    keep = probs[..., :-1].amax(-1) >= probs[..., -1]  # (N, Q)
    empty = ~keep.any(-1)  # (N,)
    k = min(max(int(fallback_topk), 0), logits.shape[1])
    if empty.any() and k > 0:
        real = logits[empty][..., :-1].softmax(-1).amax(-1)  # (E, Q)
        order = torch.sort(real, dim=-1, descending=True, stable=True).indices[:, :k]  # (E, k)
        fallback = torch.zeros_like(real, dtype=torch.bool).scatter_(1, order, True)
        keep[empty] = fallback
    return keep


class _HfDetrPreprocess:
    """The hub model's DetrImageProcessor, one image at a time (padding happens per batch)."""

    def __init__(self, processor):
        self.processor = processor

    def __call__(self, image) -> torch.Tensor:
        return self.processor(images=image, return_tensors="pt")["pixel_values"][0]  # (3, H, W)

    def __repr__(self) -> str:
        p = self.processor
        return (f"{type(p).__name__}(size={getattr(p, 'size', None)}, mean={getattr(p, 'image_mean', None)}, "
                f"std={getattr(p, 'image_std', None)}), zero-padded per batch with a pixel mask")


class DetrBackbone:
    """Frozen DETR: 100 query embeddings, their 92 logits and the object mask per meme."""

    name = "detr"

    def __init__(self, model, preprocess, model_name: str, device, fallback_topk: int = DETR_FALLBACK_TOPK,
                 weights: str | None = None, revision: str | None = None):
        self.model = model
        self.preprocess = preprocess
        self.model_name = model_name
        self.weights = weights  # the model name, "random (seed N)" or None (demo)
        self.revision = revision  # hub commit or "sha256:..." of a local folder's weights
        self.device = torch.device(device)
        self.dim = int(model.config.d_model)
        self.num_logits = int(model.config.num_labels) + 1
        self.fallback_topk = fallback_topk

    def spec(self) -> dict:
        """What the store records about this backbone."""
        return {
            "model": self.model_name,
            "weights": self.weights,
            "revision": self.revision,
            "dim": self.dim,
            "preprocessing": repr(self.preprocess),
            "output": "decoder last_hidden_state and class logits (last logit = no-object)",
            "mask_rule": "keep a query whose softmax arg-max is not no-object (ties keep); if none, keep the top "
                         f"{self.fallback_topk} by softmax over the real classes",
            "arrays": {
                "embeds": f"(N, {NUM_DETR_QUERIES}, {self.dim})",
                "logits": f"(N, {NUM_DETR_QUERIES}, {self.num_logits})",
                "mask": f"(N, {NUM_DETR_QUERIES}) uint8, 1 = object token",
            },
        }

    def prepare(self, image) -> torch.Tensor:
        """One RGB image -> normalised pixels (3, H, W)."""
        return self.preprocess(image)

    def forward(self, pixels: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Prepared images (sizes may differ) -> embeds (B, 100, D), logits (B, 100, 92), float32."""
        h = max(p.shape[1] for p in pixels)
        w = max(p.shape[2] for p in pixels)
        batch = torch.zeros(len(pixels), 3, h, w)
        mask = torch.zeros(len(pixels), h, w, dtype=torch.long)
        for i, p in enumerate(pixels):  # pad bottom/right like DetrImageProcessor.pad
            batch[i, :, : p.shape[1], : p.shape[2]] = p
            mask[i, : p.shape[1], : p.shape[2]] = 1
        out = self.model(pixel_values=batch.to(self.device), pixel_mask=mask.to(self.device))
        return out.last_hidden_state.float(), out.logits.float()

    @torch.inference_mode()
    def encode(self, images: list) -> tuple[torch.Tensor, torch.Tensor]:
        """Embed RGB PIL images -> embeds (N, 100, D), logits (N, 100, 92), float32 on the CPU."""
        if not images:
            return torch.zeros(0, NUM_DETR_QUERIES, self.dim), torch.zeros(0, NUM_DETR_QUERIES, self.num_logits)
        embeds, logits = self.forward([self.prepare(im) for im in images])
        return embeds.cpu(), logits.cpu()


def load_detr(profile: Profile, device="auto") -> DetrBackbone:
    """Load the profile's DETR, frozen and in eval mode.

    Args:
        profile: `profile.detr_model` is a hub name, a local directory, or a
            tiny DETR of the registry such as "mamikit-tiny-detr" (random init
            seeded with `profile.init_seed`, as is every model with
            `profile.weights == "random"`); None (detector none) is refused.
        device: "auto", "cpu", "cuda" or a torch.device.
    Returns:
        A DetrBackbone with `.encode(images) -> (embeds, logits)` and `.dim`.
    """
    from transformers import DetrForObjectDetection

    device = pick_device(device) if isinstance(device, (str, type(None))) else device
    name = profile.detr_model
    revision = None
    if name is None:
        raise MamikitError(f"profile {profile.name} has detector none: there is no DETR to load "
                           "(extract clip and text only, and train experiments without DETR)")
    if W.is_tiny("detr", name):
        with _seeded(profile.init_seed):
            model = DetrForObjectDetection(W.tiny_detr_config(name))
        W.spread_tiny_detr_queries(model)
        preprocess = W.TinyDetrPreprocess(W.tiny_detr_image_size(name))
    elif profile.weights == "random":
        _check_local(name, "DETR", "--detr-model")
        config = W.random_detr_config(profile)
        with _seeded(profile.init_seed):
            model = DetrForObjectDetection(config)
        preprocess = _HfDetrPreprocess(W.random_detr_processor(profile))
    else:
        from transformers import AutoImageProcessor

        _check_local(name, "DETR", "--detr-model")
        try:
            with _quiet_hub():
                model = W.load_checked(DetrForObjectDetection, name, "detr", **W.detr_load_kwargs())
                preprocess = _HfDetrPreprocess(AutoImageProcessor.from_pretrained(name))
        except MamikitError:
            raise
        except Exception as exc:
            raise _load_error("DETR", name, "--detr-model", exc,
                              "/path/to/detr-resnet-50 (a directory with config.json, weights and "
                              "preprocessor_config.json)") from None
        revision = _revision(model, name)
    if model.config.num_queries != NUM_DETR_QUERIES:
        raise MamikitError(f"DETR model {name}: {model.config.num_queries} queries, mamikit needs {NUM_DETR_QUERIES}")
    return DetrBackbone(_freeze(model, device), preprocess, name, device, weights=W.provenance(profile, "detr"),
                        revision=revision)


def _revision(model, name: str) -> str | None:
    """Hub commit of a downloaded model, or the SHA-256 of a local folder's weight files."""
    if os.path.isdir(os.path.expanduser(name)):
        return f"sha256:{W.weights_sha256(name)}"
    return W.hub_revision(model, name)


def _check_local(name: str, kind: str, option: str) -> None:
    """A name that looks like a path must exist (otherwise the hub error would be confusing)."""
    looks_local = name.startswith((".", "/", "~")) or os.path.sep + os.path.sep in name or name.count("/") > 1
    if looks_local and not os.path.isdir(os.path.expanduser(name)):
        raise MamikitError(f"{kind} model directory {name} not found (given as {option} or in the profile)")


# ---------------------------------------------------------------------------- text


class TextBackbone:
    """Frozen text encoder: lower-cased, truncated token ids and last hidden states."""

    name = "text"

    def __init__(self, model, tokenizer, model_name: str, device, max_tokens: int,
                 weights: str | None = None, revision: str | None = None):
        self.model = model  # HF BertModel, eval, frozen (reused by the model module)
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.weights = weights or model_name  # the model name or "random (seed N)"
        self.revision = revision  # hub commit or "sha256:..." of a local folder's weights
        self.device = torch.device(device)
        self.max_tokens = max_tokens
        self.dim = int(model.config.hidden_size)

    def spec(self) -> dict:
        """What the store records about this backbone."""
        return {
            "model": self.model_name,
            "weights": self.weights,
            "revision": self.revision,
            "dim": self.dim,
            "preprocessing": f"lower-cased, {type(self.tokenizer).__name__}, at most {self.max_tokens} tokens "
                             "including [CLS]/[SEP]",
            "output": "last_hidden_state of the frozen encoder",
            "max_tokens": self.max_tokens,
            # the ids the model gives its own [CLS]/[SEP] (shared encoder): the tokenizer's, not BERT's 101/102
            "cls_token_id": self.tokenizer.cls_token_id,
            "sep_token_id": self.tokenizer.sep_token_id,
            "layout": "ragged: the tokens of all memes concatenated; meme i is rows offsets[i]:offsets[i+1]",
            "arrays": {"input_ids": "(T,) int32", "hidden": f"(T, {self.dim})", "offsets": "(N + 1,) int64"},
        }

    def tokenize(self, texts: list[str]):
        """Lower-case and tokenize -> input_ids (N, T) long and attention_mask (N, T), padded with 0."""
        texts = [("" if t is None or t != t else str(t)).lower() for t in texts]  # t != t: NaN from pandas
        return self.tokenizer(
            texts, truncation=True, max_length=self.max_tokens, padding=True, return_tensors="pt",
            return_token_type_ids=False,
        )

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Token ids (B, T) -> last hidden states (B, T, D) float32."""
        out = self.model(input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device))
        return out.last_hidden_state.float()

    @torch.inference_mode()
    def encode(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Texts -> input_ids (N, T) long, attention_mask (N, T) bool, hidden (N, T, D) float32 (CPU)."""
        tok = self.tokenize(list(texts))
        hidden = self.forward(tok["input_ids"], tok["attention_mask"]).cpu()
        return tok["input_ids"], tok["attention_mask"].bool(), hidden


def load_text(profile: Profile, device="auto") -> TextBackbone:
    """Load the profile's text encoder and tokenizer, frozen and in eval mode.

    Args:
        profile: `profile.text_model` is a hub name or a local directory;
            `profile.max_text_tokens` the truncation length (120 in the paper);
            `profile.weights == "random"` builds the architecture with weights
            seeded by `profile.init_seed` instead of loading them.
        device: "auto", "cpu", "cuda" or a torch.device.
    Returns:
        A TextBackbone with `.model` (HF model), `.tokenizer`, `.encode(texts)` and `.dim`.
    """
    from transformers import AutoModel, AutoTokenizer

    device = pick_device(device) if isinstance(device, (str, type(None))) else device
    name = profile.text_model
    _check_local(name, "text", "--text-model")
    revision = None
    if profile.weights == "random" or W.is_tiny("text", name):  # a tiny text model has no weights to load
        with _seeded(profile.init_seed):
            tokenizer, model = W.random_text(profile)
    else:
        try:
            with _quiet_hub():
                tokenizer = AutoTokenizer.from_pretrained(name)
                model = W.load_checked(AutoModel, name, "text")
        except MamikitError:
            raise
        except Exception as exc:
            raise _load_error("text", name, "--text-model", exc,
                              "/path/to/dir (a directory with config.json, weights and tokenizer files)") from None
        revision = _revision(model, name)
    return TextBackbone(_freeze(model, device), tokenizer, name, device, profile.max_text_tokens,
                        weights=W.provenance(profile, "text"), revision=revision)


LOADERS = {"clip": load_clip, "detr": load_detr, "text": load_text}


def load_backbones(profile: Profile, names=("clip", "detr", "text"), device="auto") -> dict:
    """Load several backbones by name -> {"clip": ClipBackbone, ...}."""
    unknown = [n for n in names if n not in LOADERS]
    if unknown:
        raise MamikitError(f"unknown backbone(s) {', '.join(unknown)}; choose from clip, detr, text")
    return {n: LOADERS[n](profile, device) for n in names}


def describe(name: str | Profile, weights: str = "random") -> dict:
    """Build a profile's backbones on the CPU and report what the models say of themselves.

    The widths are read from the built models (`Backbone.dim`, as extraction records them in the store),
    never from the registry. A full-size profile with `weights="random"` builds its real architectures
    (ViT-L-14: a few seconds and about 1 GB of memory).

    Args:
        name: a profile name or Profile.
        weights: "random" (nothing downloaded) or "pretrained".
    Returns:
        {"clip" | "detr" | "text": {"model", "dim", "params"} or None for detector none}.
    """
    profile = name if isinstance(name, Profile) else get_profile(name, weights=weights)
    out = {}
    for kind, load in LOADERS.items():
        if kind == "detr" and not profile.has_detector:
            out[kind] = None
            continue
        backbone = load(profile, "cpu")
        model = backbone.model.visual if kind == "clip" else backbone.model
        out[kind] = {"model": backbone.model_name, "dim": backbone.dim,
                     "params": sum(p.numel() for p in model.parameters())}
        del backbone
    return out
