"""The paper's experiments (tables 2-5) by name, its four ablation rounds (section 5.1), and round 5.

Each experiment is a frozen :class:`Experiment` whose fields are the switches of
section 5.1: `xformer_enc`, `pooling`, `proj_align`, `contrastive`,
`multi_task`, `image_encoders`. Vary one with :func:`get_experiment` overrides or
`dataclasses.replace`, which both reject unknown fields. This module is a
registry of names: it runs nothing (`mamikit.rounds` trains a round).

Round 5 (:data:`FUTURE_EXPERIMENTS`, table 6) goes beyond the paper: the
future work its conclusion (section 6) names, each as experiment 30 with one
change, so that table 6 compares each against 30.

One switch goes beyond the paper's experiments: `query_align`, the objective
its conclusion (section 6) proposes as future work from figure 3's observation
(`losses.query_alignment_loss`); off in every experiment of tables 2-5. And
one field goes beyond its datasets (section 6's "more datasets"):
`extra_datasets`, datasets of mamikit/tasks.json trained besides the primary
one and the multi-task ones, text-only or image-only ones included; empty in
every experiment of tables 2-5.

An experiment may also name its backbone profile (`profile`, a name of
mamikit/profiles.json): section 6 asks for the systems on "different backbone
architectures". None trains on the run's profile; a name trains on that profile
(its tiny variant under a tiny run profile such as `demo`) from its own store
(`profiles.for_experiment`, `store.store_dir`).

Every experiment also carries a recipe (docs/fidelity.md): the switches where
the paper and its authors' code differ or the paper is silent. ``"paper"`` is
what the paper says and, where it is silent or ambiguous, what the authors'
code does; ``"authors"`` additionally reproduces what that code did against
the paper's text. :func:`recipe_switches` gives a recipe's switch values.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .profiles import profile_names
from .registry import dataset_modalities, training_datasets
from .utils import MamikitError

XFORMER_ENCS = ("shared", "multi")  # section 3.2
POOLINGS = ("cls", "none", "txt_cls")  # section 3.3
IMAGE_ENCODERS = ("clip", "detr")  # image encoders, in the order their segments take in the sequence

# The configuration rows of tables 2-5: (Experiment field, row name as the paper prints it).
TABLE_ROWS = (
    ("recipe", "Recipe"),  # "paper" or "authors" (docs/fidelity.md); empty for runs older than recipes
    ("xformer_enc", "Xformer Enc"),
    ("pooling", "Pooling"),
    ("proj_align", "Proj Algn"),
    ("contrastive", "Contrastive"),
    ("multi_task", "Multi-task"),
    ("image_encoders", "Backbones"),
)
# Rows of switches beyond the paper's tables (section 6's future work): `Experiment.display` adds them after
# TABLE_ROWS; tables 2-5 (mamikit.analysis) keep the paper's rows.
EXTRA_ROWS = (
    ("query_align", "Query Algn"),
    ("profile", "Profile"),  # the backbone profile an experiment names; empty: the run's own
    ("extra_datasets", "Extra data"),
)
# How the paper's tables print switch values (booleans print Yes/No).
DISPLAY = {
    "xformer_enc": {"shared": "Shared", "multi": "Multi"},
    "pooling": {"cls": "[CLS]", "none": "No", "txt_cls": "txt [CLS]"},
    "image_encoders": {"clip": "CLIP", "detr": "DETR"},
}


def display_value(field: str, value) -> str:
    """One switch value as tables 2-5 print it ("Shared", "[CLS]", "Yes", "CLIP and DETR"); "" when unknown."""
    if value is None:
        return ""
    if field == "image_encoders":
        return " and ".join(DISPLAY[field].get(b, str(b)) for b in value if b != "text")
    if field == "extra_datasets":
        return ", ".join(value) if value else "No"
    if isinstance(value, bool):
        return "Yes" if value else "No"
    return DISPLAY.get(field, {}).get(value, str(value))


def check_switches(xformer_enc: str, pooling: str, image_encoders, where: str) -> tuple[str, ...]:
    """Check the section 5.1 switches; return the image encoders in sequence order (CLIP before DETR).

    The one place these rules live: :class:`Experiment` calls it, and a
    ``model.ModelConfig`` reads its switches from an Experiment, so a model built
    by hand is held to the same rules. It sits in the registry because that is
    where the switch names are defined, and the registry needs neither torch nor
    the model.

    Args:
        xformer_enc, pooling, image_encoders: the switches (an empty `image_encoders` is the text alone).
        where: what is being checked, the start of the error message.
    """
    if xformer_enc not in XFORMER_ENCS:
        raise MamikitError(f"{where}: xformer_enc must be one of {XFORMER_ENCS}, got {xformer_enc!r}")
    if pooling not in POOLINGS:
        raise MamikitError(f"{where}: pooling must be one of {POOLINGS}, got {pooling!r}")
    if pooling == "cls" and xformer_enc != "shared":
        raise MamikitError(f"{where}: pooling 'cls' needs the shared encoder (the global [CLS], section 3.3)")
    if pooling == "txt_cls" and xformer_enc != "multi":
        raise MamikitError(f"{where}: pooling 'txt_cls' needs multi encoders (the text's own [CLS], section 5.1)")
    image_encoders = tuple(image_encoders)
    if any(b not in IMAGE_ENCODERS for b in image_encoders) or len(set(image_encoders)) != len(image_encoders):
        raise MamikitError(f"{where}: image_encoders must be distinct names from {IMAGE_ENCODERS}, "
                           f"got {image_encoders!r}")
    return tuple(b for b in IMAGE_ENCODERS if b in image_encoders)


@dataclass(frozen=True)
class Experiment:
    """One system configuration of section 5.1."""

    name: str  # the paper's experiment id, e.g. "30"
    xformer_enc: str  # "shared" (figure 1a) or "multi" (figure 1b) transformer encoders
    pooling: str  # "cls" (multi-head MLP), "none" or "txt_cls" (decoder + single-head MLP)
    proj_align: bool  # token encoding projection alignment loss, eq. 2
    contrastive: bool  # contrastive embedding loss, eq. 3-4
    multi_task: bool  # also learn from Facebook Hateful Memes (section 3.4)
    # image encoders: ("clip",), ("detr",) or ("clip", "detr") (tables' "Backbones"); () the text alone
    image_encoders: tuple[str, ...]
    epochs: int = 15  # training epochs (experiment 30: 30)
    # positive decoder outputs pulled toward their class query (section 6's future work; not in tables 2-5)
    query_align: bool = False
    # backbone profile of mamikit/profiles.json (section 6's "different backbone architectures"); None: the run's
    profile: str | None = None
    # datasets trained beyond the primary and the multi-task ones, from mamikit/tasks.json (section 6)
    extra_datasets: tuple[str, ...] = ()
    # --- recipe switches (docs/fidelity.md; the defaults are the "paper" recipe)
    recipe: str = "paper"  # "paper" | "authors": where the switches below started from
    per_task_decoding: bool = True  # row 1: the decoder runs per task over the task's own class queries (3.4)
    pos_weight: bool = True  # row 2: BCE pos_weight = negatives/positives per label on the training split
    bert_pooler: bool = True  # row 6: [CLS] pooling (00, then dropout 0.1) and txt [CLS] (03) via BERT's pooler
    head_dropout: float = 0.1  # row 7: dropout before the MLP heads' second layer
    detr_slot_positions: bool = True  # row 4: a kept DETR query's position is its slot 0..99, packed or not
    head_gelu_as_coded: bool = False  # row 7: GELU in the MLP heads only where the contrastive loss is on
    text_dropout_in_train: bool = False  # row 5: frozen BERT re-run in train mode (dropout on) while training
    decoder_layer_copies: bool = False  # row 9: all decoder layers start as copies of one
    align_all_pairs: bool = False  # row 10: eq. 2 averaged over all B x B pairs, the diagonal included
    decay_by_name: bool = False  # row 16: weight decay spares biases and the embedding LayerNorms only
    contrastive_as_coded: bool = False  # row 8: eq. 3-4 as the authors' code computes and sums it (losses.py)
    # row 11: text length with [CLS]/[SEP] the run expects of its store; None = the store's
    text_tokens: int | None = None
    # row 12: shared-mode positions from 0 in every segment, frozen types; image type row 0
    segments_as_coded: bool = False
    authors_split: bool = False  # row 13: train/dev as the authors' train_test_split (seed 3704, file order)
    tied_text_embeddings: bool = False  # row 18: image encoders' positions, type and LayerNorm are BERT's own tensors
    schedule_as_coded: bool = False  # row 21: windows by batch index within each epoch, leftovers carried over

    def __post_init__(self):
        encoders = check_switches(self.xformer_enc, self.pooling, self.image_encoders, f"experiment {self.name}")
        # Canonical order so ("detr", "clip") and ("clip", "detr") are the same experiment.
        object.__setattr__(self, "image_encoders", encoders)
        if self.epochs < 1:
            raise MamikitError(f"experiment {self.name}: epochs must be positive")
        if self.query_align and self.pooling == "cls":
            raise MamikitError(f"experiment {self.name}: query_align needs the decoder's class queries "
                               "(pooling 'none' or 'txt_cls'), not pooling 'cls'")
        if self.profile is not None and self.profile not in profile_names():
            raise MamikitError(f"experiment {self.name}: unknown profile {self.profile!r}; registered: "
                               f"{', '.join(profile_names())}")
        self._check_extra_datasets()
        if self.recipe not in RECIPES:
            raise MamikitError(f"experiment {self.name}: recipe must be one of {tuple(RECIPES)}, got {self.recipe!r}")
        if not 0.0 <= self.head_dropout < 1.0:
            raise MamikitError(f"experiment {self.name}: head_dropout must be in [0, 1), got {self.head_dropout}")
        if self.text_tokens is not None and self.text_tokens < 3:
            raise MamikitError(f"experiment {self.name}: text_tokens must be None or at least 3 "
                               f"([CLS], a token, [SEP]), got {self.text_tokens}")

    def _check_extra_datasets(self) -> None:
        """Extra datasets: names of mamikit/tasks.json not trained already, with a modality the experiment reads."""
        extra = self.extra_datasets
        extra = (extra,) if isinstance(extra, str) else tuple(extra)
        object.__setattr__(self, "extra_datasets", extra)
        if len(set(extra)) != len(extra):
            raise MamikitError(f"experiment {self.name}: extra_datasets {extra} names a dataset twice")
        if not extra:
            return
        try:
            training_datasets(self.multi_task, extra=extra)
        except MamikitError as exc:
            raise MamikitError(f"experiment {self.name}: {exc}") from None
        for name in extra:
            if dataset_modalities(name) == ("image",) and not self.image_encoders:
                raise MamikitError(f"experiment {self.name}: extra dataset {name} holds only images and the "
                                   "experiment reads no image encoder (image_encoders is empty)")
            if dataset_modalities(name) == ("image",) and self.pooling == "txt_cls":
                raise MamikitError(f"experiment {self.name}: extra dataset {name} holds only images; pooling "
                                   "'txt_cls' reads the text's own [CLS] (use pooling 'none')")

    def switches(self) -> dict:
        """The recipe switch values of this experiment (every field after `recipe`)."""
        return {name: getattr(self, name) for name in SWITCHES}

    @property
    def datasets(self) -> tuple[str, ...]:
        """Datasets trained on: the primary one (MAMI), the multi-task ones of mamikit/tasks.json when multi-task
        (3.4), then `extra_datasets`."""
        return training_datasets(self.multi_task, extra=self.extra_datasets)

    def display(self) -> dict[str, str]:
        """The configuration rows as the paper's tables print them, then the rows beyond them (:data:`EXTRA_ROWS`)."""
        return {row: display_value(field, getattr(self, field)) for field, row in TABLE_ROWS + EXTRA_ROWS}

    @classmethod
    def from_dict(cls, fields: dict) -> "Experiment":
        """The experiment a run's config.json recorded (runs written before `image_encoders` say `backbones`)."""
        fields = dict(fields)
        if "backbones" in fields:
            fields.setdefault("image_encoders", fields.pop("backbones"))
        fields["image_encoders"] = tuple(fields["image_encoders"])
        if "extra_datasets" in fields:
            fields["extra_datasets"] = tuple(fields["extra_datasets"] or ())
        try:
            return cls(**fields)
        except TypeError as exc:
            raise MamikitError(f"recorded experiment {fields.get('name')!r}: {exc}") from None


# The recipe switches: every Experiment field after `recipe`.
_FIELDS = [f.name for f in dataclasses.fields(Experiment)]
SWITCHES = tuple(_FIELDS[_FIELDS.index("recipe") + 1:])

# Each recipe's switch values where they differ from the field defaults (the "paper" recipe).
RECIPES: dict[str, dict] = {
    "paper": {},
    "authors": {
        "head_gelu_as_coded": True,
        "text_dropout_in_train": True,
        "decoder_layer_copies": True,
        "align_all_pairs": True,
        "decay_by_name": True,
        "contrastive_as_coded": True,
        "text_tokens": 121,  # max_length 120 + 1 with [CLS] and [SEP]: 119 word pieces
        "segments_as_coded": True,
        "authors_split": True,
        "tied_text_embeddings": True,
        "schedule_as_coded": True,
    },
}


def recipe_switches(name: str) -> dict:
    """Every switch value of recipe `name` ("paper" or "authors")."""
    if name not in RECIPES:
        raise MamikitError(f"unknown recipe {name!r}; known: {', '.join(RECIPES)}")
    defaults = {f.name: f.default for f in dataclasses.fields(Experiment) if f.name in SWITCHES}
    return dict(defaults, **RECIPES[name])


def _exp(name, xformer_enc, pooling, proj_align=False, contrastive=False, multi_task=False,
         image_encoders=("clip", "detr"), epochs=15):
    return Experiment(name, xformer_enc, pooling, proj_align, contrastive, multi_task, tuple(image_encoders), epochs)


PAPER_EXPERIMENTS: dict[str, Experiment] = {
    e.name: e
    for e in [
        # Round 1 (table 2): encoder variant and pooling.
        _exp("00", "shared", "cls"),
        _exp("01", "shared", "none"),
        _exp("02", "multi", "none"),
        _exp("03", "multi", "txt_cls"),
        # Round 2 (table 3): auxiliary objectives on the round-1 winner (02).
        _exp("10", "multi", "none", proj_align=True),
        _exp("12", "multi", "none", contrastive=True),
        _exp("13", "multi", "none", proj_align=True, contrastive=True),
        # Round 3 (table 4): image backbones on the round-2 winner (10).
        _exp("20", "multi", "none", proj_align=True, image_encoders=("clip",)),
        _exp("21", "multi", "none", proj_align=True, image_encoders=("detr",)),
        # Round 4 (table 5): extra data from FBHM, 15 more epochs (section 5.1.4).
        _exp("30", "multi", "none", proj_align=True, multi_task=True, epochs=30),
    ]
}

# Epochs of every experiment but 30 (section 4).
PAPER_EPOCHS = 15

# Round 5: the future work of section 6 (conclusion) on experiment 30, the winner of round 4; each
# experiment is 30 with one change. Not in the paper; table 6 is mamikit's own (docs/round5.md).
FUTURE_EXPERIMENTS: dict[str, Experiment] = {
    e.name: e
    for e in [
        dataclasses.replace(PAPER_EXPERIMENTS["30"], name="40", query_align=True),  # decoder rows toward queries
        dataclasses.replace(PAPER_EXPERIMENTS["30"], name="41", profile="vit-l-14"),  # Hate-CLIPper's ViT-L/14
        dataclasses.replace(PAPER_EXPERIMENTS["30"], name="42", extra_datasets=("HSText",)),  # + a text-only set
    ]
}

# Every experiment by name: the paper's and round 5's.
EXPERIMENTS: dict[str, Experiment] = {**PAPER_EXPERIMENTS, **FUTURE_EXPERIMENTS}

# Section 5.1: each round compares these experiments (the previous winner first).
ROUNDS: dict[int, list[str]] = {
    1: ["00", "01", "02", "03"],
    2: ["02", "10", "12", "13"],
    3: ["10", "20", "21"],
    4: ["10", "30"],
    5: ["30", *FUTURE_EXPERIMENTS],  # section 6: other backbones, more data, the query-alignment objective
}

# The table number for each round: the paper's tables 2-5, and table 6 for round 5.
ROUND_TABLES = {1: 2, 2: 3, 3: 4, 4: 5, 5: 6}

# The rounds of the paper (section 5.1); round 5 goes beyond it.
PAPER_ROUNDS = (1, 2, 3, 4)


def get_experiment(name: str, recipe: str = "paper", **overrides) -> Experiment:
    """Look up a paper experiment by name under a recipe, optionally replacing fields.

    Args:
        name: a paper experiment ("00", "01", "02", "03", "10", "12", "13", "20", "21", "30") or one of
            round 5 (:data:`FUTURE_EXPERIMENTS`: "40" ...).
        recipe: "paper" or "authors" (:func:`recipe_switches`).
        **overrides: Experiment fields to change (unknown fields are rejected).
    Returns:
        The frozen Experiment.
    """
    try:
        exp = EXPERIMENTS[str(name)]
    except KeyError:
        raise MamikitError(f"unknown experiment {name!r}; known: {', '.join(EXPERIMENTS)}") from None
    exp = dataclasses.replace(exp, recipe=recipe, **recipe_switches(recipe))
    if overrides:
        try:
            exp = dataclasses.replace(exp, **overrides)
        except TypeError as exc:
            raise MamikitError(f"experiment {name}: {exc}") from None
    return exp


def experiment_tasks(experiment: Experiment, tasks_path=None) -> tuple:
    """Every task of every dataset the experiment trains on (table 1, from mamikit/tasks.json)."""
    from .data import load_tasks

    tasks = load_tasks(tasks_path)
    out = []
    for name in experiment.datasets:
        if name not in tasks:
            raise MamikitError(f"experiment {experiment.name} needs dataset {name}, "
                               "which the task table does not define")
        out.extend(tasks[name])
    return tuple(out)
