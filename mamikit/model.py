"""The multi-modal multi-transformer classifier of sections 3.1-3.4 in one file.

Data flow of :class:`MamiModel` (figure 1 and 2 of the paper):

1. Token embedding (3.1): CLIP vectors (B, 5, Dc) and DETR object vectors
   (B, Q, Dd) are linearly projected to the text model's hidden size D; the
   text stays in BERT's own space (word ids, or cached hidden states).
2. Sequence embedding (3.2), ``xformer_enc``:
   - ``"shared"``: ``[CLS]`` + CLIP + ``[SEP]`` + DETR + ``[SEP]`` + text, one
     token type per encoder, positions counted within each segment, BERT's
     embedding LayerNorm, then the pretrained BERT layers as the shared encoder.
   - ``"multi"``: one ``nn.TransformerEncoder`` per image encoder with its own
     token-type and position embeddings and LayerNorm; the text goes through
     the text model with its own ``[CLS]``/``[SEP]``; outputs are concatenated.
3. Classification (3.3), ``pooling``:
   - ``"cls"`` (shared only): the global ``[CLS]`` vector into a multi-head
     MLP per task (one logit per label of the task).
   - ``"none"``: the whole sequence is the memory of a transformer decoder
     whose targets are learnable class queries, one per label (kept by label
     name, shared by every task holding the label); a single-head MLP per
     task maps each of the task's query outputs to its logit. With
     ``per_task_decoding`` (3.3-3.4, table 1's note) the decoder runs for
     each task over that task's queries only, self-attention among the task's
     own labels: all tasks of the batch's dataset in one pass, their query
     sets concatenated (MAMI: Task_A 1 + Task_B 4 + MAMI 5 = 10 rows) under a
     block-diagonal self-attention mask, which equals one pass per task.
   - ``"txt_cls"`` (multi only): like ``"none"`` but the text part of the
     memory is reduced to its ``[CLS]`` vector.
4. Multi-task (3.4): every task has its own MLP head; everything else,
   including the class queries, is shared by all tasks of all datasets.

Datasets of one modality (section 6, mamikit/tasks.json's ``modalities``):
a batch says what its dataset holds (``Batch.modalities``; one dataset per
batch, algorithm 1), and the encoders of an absent modality do not run. A
text-only batch's memory is the text (multi) or ``[CLS]`` + text (shared); an
image-only batch's is its image segments, with the shared ``[CLS]`` first. No
zero-filled stand-ins enter the memory, so the decoder attends to what
exists. ``"txt_cls"`` pooling needs the text and refuses an image-only batch;
``"none"`` and the shared ``"cls"`` (the global ``[CLS]`` token) read either.

Two regroupings keep the function and drop most of the work
(``ModelConfig.fast_path``, on by default): each image encoder's layers run on
the real tokens only (`fastpath.packed_encoder`), and the decoder's key/value
projections act on its class queries instead of the memory
(`fastpath.folded_cross_attention`). ``fast_path=False`` calls the stock
``nn.TransformerEncoder`` / ``nn.MultiheadAttention`` on the padded inputs
instead: the straightforward reference, same weights, same function.
``return_attention=True`` runs the decoder's cross-attention through
``nn.MultiheadAttention`` itself (it returns the weights).

The file is longer than mamikit's other modules (over 500 lines) so that the
whole forward pass, configuration to logits, reads in one place; only the
fast-path kernels, each standing for one stock PyTorch call, live in
`fastpath.py`.

The text model is a transformers ``BertModel`` (frozen and kept in eval mode
unless ``finetune_text``). The authors' code (docs/fidelity.md) also shapes two
embedding details: ``segments_as_coded`` (row 12: shared-mode positions and
types, the multi encoders' type row) and ``tied_text_embeddings`` (row 18: the
multi encoders' positions, type and LayerNorm are parameters over the text
model's own tensors, so training drifts the text states and the cached ones
are not read while the storage is shared). Tasks are any objects with ``name``, ``dataset`` and
``labels`` (``mamikit.data.Task``).
"""

from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .backbones import NUM_DETR_QUERIES
from .experiments import Experiment
from .fastpath import dropped, folded_cross_attention, packed_encoder, residual
from .profiles import Profile
from .utils import MamikitError

# Number of positions each image encoder can produce (section 3.1): the whole
# image + its 2x2 slices for CLIP, DETR's object queries.
MAX_TOKENS = {"clip": 5, "detr": NUM_DETR_QUERIES}


# The Experiment fields that shape the model (section 5.1's switches and the recipe rows of docs/fidelity.md),
# read through ModelConfig as `cfg.<name>`: their one home is the experiment.
MODEL_SWITCHES = ("xformer_enc", "pooling", "image_encoders", "per_task_decoding", "bert_pooler", "head_dropout",
                  "detr_slot_positions", "text_dropout_in_train", "decoder_layer_copies", "segments_as_coded",
                  "tied_text_embeddings")
# The Profile fields that size the trainable transformers (sections 3.2-3.3), read as `cfg.<name>`.
MODEL_SIZES = ("encoder_layers", "decoder_layers", "num_heads", "ffn_dim", "mlp_hidden")


@dataclass(frozen=True)
class ModelConfig:
    """The architecture of :class:`MamiModel`: one experiment at one profile's sizes, on one store's widths.

    Each value has one home. The switches are the experiment's (``cfg.pooling``
    reads ``cfg.experiment.pooling``, :data:`MODEL_SWITCHES`), the layer counts
    and widths the profile's (:data:`MODEL_SIZES`), the feature widths and the
    ``[CLS]``/``[SEP]`` ids the feature store's; only what no other
    configuration holds lives here. :meth:`from_experiment` builds one from a
    store's widths; a notebook varies an experiment with
    ``get_experiment("02", pooling="txt_cls")`` and builds the model from that.
    """

    experiment: Experiment  # the system (section 5.1): encoders, pooling, and the recipe rows that shape the model
    profile: Profile  # layers, heads and widths of the trainable transformers (sections 3.2-3.3)
    tasks: tuple  # every task the model serves (objects with name, dataset, labels), section 3.4
    clip_dim: int  # width of the stored CLIP vectors (RN50x4: 640); any when the experiment leaves CLIP out
    detr_dim: int  # width of the stored DETR query vectors (DETR-R50: 256); any when it leaves DETR out
    cls_token_id: int  # [CLS] of the tokenizer the store was extracted with (uncased BERT: 101; RoBERTa's <s>: 0)
    sep_token_id: int  # [SEP] of that tokenizer (uncased BERT: 102; RoBERTa's </s>: 2)
    dropout: float = 0.1  # dropout of new embeddings, image encoders and decoder (PyTorch's default, section 3.2)
    finetune_text: bool = False  # train the text model too (paper: frozen, section 3.1)
    fast_path: bool = True  # packed encoders and folded cross-attention; False: stock modules on padded inputs

    def __post_init__(self):
        object.__setattr__(self, "tasks", tuple(self.tasks))
        if not self.tasks:
            raise MamikitError("model config: tasks is empty; the model needs at least one task")
        names = [t.name for t in self.tasks]
        if any(not name or "." in name for name in names):
            raise MamikitError(f"model config: task names {names} must be non-empty and free of '.'")
        if len(set(names)) != len(names):
            raise MamikitError(f"model config: task names {names} repeat a name")
        for task in self.tasks:
            labels = tuple(task.labels)
            if not labels or len(set(labels)) != len(labels):
                raise MamikitError(f"model config: task {task.name} needs distinct labels, got {labels}")
        for name in ("clip_dim", "detr_dim"):
            if getattr(self, name) < 1:
                raise MamikitError(f"model config: {name} must be positive, got {getattr(self, name)}")
        for name in ("cls_token_id", "sep_token_id"):
            if getattr(self, name) < 0:
                raise MamikitError(f"model config: {name} must be a word id, got {getattr(self, name)}")
        if not 0.0 <= self.dropout < 1.0:
            raise MamikitError(f"model config: dropout must be in [0, 1), got {self.dropout}")

    @classmethod
    def from_experiment(cls, experiment, profile, widths: dict, tasks, **fields) -> "ModelConfig":
        """The architecture of an experiment (section 5.1) at a profile's sizes, on a store's widths.

        Args:
            experiment: an ``experiments.Experiment`` (its switches).
            profile: a ``profiles.Profile`` (layers, heads, widths).
            widths: backbone -> width of its stored vectors (``FeatureStore.dims``).
            tasks: every task the model serves.
            **fields: ``cls_token_id`` and ``sep_token_id`` (``FeatureStore.special_ids``), and the
                other ModelConfig fields (``dropout``, ``finetune_text``, ``fast_path``).
        Returns:
            The ModelConfig.
        """
        known = {f.name for f in dataclasses.fields(cls)} - {"experiment", "profile", "tasks", "clip_dim", "detr_dim"}
        unknown = sorted(set(fields) - known)
        missing = [k for k in ("cls_token_id", "sep_token_id") if k not in fields]
        if unknown or missing:
            raise MamikitError(f"model config: unknown field(s) {', '.join(unknown)}" if unknown else
                               f"model config: {' and '.join(missing)} must be given (the store's tokenizer's)")
        # a backbone the experiment leaves out has no stored width to match: any positive one does
        return cls(experiment=experiment, profile=profile, tasks=tuple(tasks), clip_dim=int(widths.get("clip", 1)),
                   detr_dim=int(widths.get("detr", 1)), **fields)

    @property
    def head_gelu(self) -> bool:
        """GELU between the MLP head's layers (3.3); the authors' head has it only where the contrastive loss is on."""
        return self.experiment.contrastive or not self.experiment.head_gelu_as_coded

    @property
    def labels(self) -> tuple[str, ...]:
        """Distinct labels over all tasks, first-seen order: one class query each."""
        return tuple(dict.fromkeys(label for task in self.tasks for label in task.labels))

    def record(self) -> dict:
        """What a checkpoint records of the architecture, to recognise its configuration (JSON values).

        Flat, with the names of checkpoint format 1 (``head_activation`` for :attr:`head_gelu`,
        ``text_dropout`` for the switch ``text_dropout_in_train``), so that checkpoints written
        before the configuration was composed still load. ``fast_path`` only chooses how the
        model computes: either path loads the other's weights. The loss switches that shape no
        weight (``proj_align``, ``query_align``) are not recorded: a run's config.json holds them.
        """
        values = {name: getattr(self, name) for name in MODEL_SWITCHES + MODEL_SIZES}
        values.update(head_activation=self.head_gelu, text_dropout=values.pop("text_dropout_in_train"))
        values.update(tasks=[dataclasses.asdict(t) if dataclasses.is_dataclass(t) else str(t) for t in self.tasks],
                      clip_dim=self.clip_dim, detr_dim=self.detr_dim, dropout=self.dropout,
                      finetune_text=self.finetune_text, cls_token_id=self.cls_token_id, sep_token_id=self.sep_token_id)
        return json.loads(json.dumps(values, default=str))


def _delegate(source: str, name: str) -> property:
    return property(lambda self: getattr(getattr(self, source), name), doc=f"``{source}.{name}``")


for _name in MODEL_SWITCHES:
    setattr(ModelConfig, _name, _delegate("experiment", _name))
for _name in MODEL_SIZES:
    setattr(ModelConfig, _name, _delegate("profile", _name))


@dataclass
class Batch:
    """One mini-batch of stored backbone outputs from a single dataset (section 3.4)."""

    dataset: str
    ids: list[str]
    labels: tuple[str, ...]  # the dataset's labels, order of the `targets` columns
    targets: torch.Tensor | None  # (B, L) float 0/1, -1 = unknown
    clip: torch.Tensor | None  # (B, 5, Dc)
    detr: torch.Tensor | None  # (B, Q, Dd) tokens fed to the encoder (Q = 100 or packed)
    detr_mask: torch.Tensor | None  # (B, Q) bool, True = real object token
    detr_all: torch.Tensor | None  # (B, 100, Dd) every stored query, for eq. 2
    text_ids: torch.Tensor | None  # (B, T) long, [CLS] ... [SEP], padded with 0; None when the data has no text
    text_mask: torch.Tensor | None  # (B, T) bool
    text_hidden: torch.Tensor | None = None  # (B, T, Dt) cached states of the frozen text model
    detr_slots: torch.Tensor | None = None  # (B, Q) long, DETR slot 0..99 of each token; None: its index in `detr`
    # what the batch's dataset holds: ("image", "text") for memes, ("text",) or ("image",) (section 6)
    modalities: tuple[str, ...] = ("image", "text")

    @property
    def device(self) -> torch.device:
        """Where the batch's tensors are (those of the modalities it has)."""
        first = self.text_ids if self.text_ids is not None else next(
            v for v in (self.clip, self.detr, self.targets) if v is not None)
        return first.device

    def to(self, device) -> "Batch":
        """A copy with every tensor on `device`."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        device = torch.device(device)
        # A tensor already there is kept: `to` would return it too, after an operator's dispatch.
        return Batch(**{k: v.to(device) if torch.is_tensor(v) and not _on(v, device) else v for k, v in values.items()})


def _on(tensor: torch.Tensor, device: torch.device) -> bool:
    """Whether `tensor` is on `device` ("cuda" without an index: the current CUDA device)."""
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return tensor.device == device


@dataclass
class ModelOutput:
    """Everything the losses (section 3.5) and the figures need from one forward pass."""

    logits: dict[str, torch.Tensor]  # task -> (B, k)
    mlp_inputs: dict[str, list[torch.Tensor]]  # task -> per MLP layer input (B, k, D_l), eq. 3
    projections: dict[str, tuple[torch.Tensor, torch.Tensor]]  # encoder -> (f (B,P,Din), g (B,P,D)), eq. 2
    decoder_out: torch.Tensor | None = None  # (B, R, D), one row per `decoder_rows` entry
    # (task, label) of each decoder row; task None when all labels are decoded together.
    decoder_rows: tuple[tuple[str | None, str], ...] = ()
    queries: torch.Tensor | None = None  # (C, D) learnt class queries, C = model.labels
    query_labels: tuple[str, ...] = ()  # the label of each row of `queries` (model.labels)
    self_attn: list[torch.Tensor] | None = None  # per decoder layer (B, R, R), head-averaged, block-diagonal by task
    cross_attn: list[torch.Tensor] | None = None  # per decoder layer (B, R, S), head-averaged
    memory_mask: torch.Tensor | None = None  # (B, S) bool, True = real token
    # "clip"/"detr"/"text" -> [start, end) in memory; "shared" adds "cls" (0, 1) and
    # counts each image segment's closing [SEP] in the segment.
    memory_segments: dict[str, tuple[int, int]] = field(default_factory=dict)


class DecoderLayer(nn.Module):
    """Post-norm transformer decoder layer, as ``nn.TransformerDecoderLayer`` (relu, no causal mask).

    Written out so that it can also return the head-averaged self- and
    cross-attention weights (figure 4); without them its cross-attention takes
    the folded form (`fast_path`) or the stock module call. Parameter names
    follow ``nn.TransformerDecoderLayer``.
    """

    def __init__(self, d_model: int, num_heads: int, ffn_dim: int, dropout: float, fast_path: bool = True):
        super().__init__()
        self.fast_path = fast_path
        self.self_attn = nn.MultiheadAttention(d_model, num_heads, dropout=dropout, batch_first=True)
        self.multihead_attn = nn.MultiheadAttention(d_model, num_heads, dropout=dropout, batch_first=True)
        self.linear1 = nn.Linear(d_model, ffn_dim)
        self.linear2 = nn.Linear(ffn_dim, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.norm3 = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)

    def forward(self, x, memory, memory_pad, need_weights: bool = False, self_mask=None):
        """x (B, C, D), memory (B, S, D), memory_pad (B, S) True = padding -> (x, self (B,C,C), cross (B,C,S)).

        `self_mask` (C, C) bool, True = query i may not attend to query j (None: all may).
        """
        bsz = x.shape[0]
        # The first layer's queries are the class queries, one (C, D) set expanded over the batch
        # (stride 0): without live dropout their self-attention block is the same for every meme (3.3),
        # so the fast path computes it once and the cross-attention folds them once.
        shared = self.fast_path and bsz > 1 and x.stride(0) == 0 and not (self.training and self.dropout.p > 0)
        if shared:
            x = x[:1]
        attn, self_w = self.self_attn(x, x, x, attn_mask=self_mask, need_weights=need_weights)
        x = self.norm1(x + dropped(self.dropout1, attn))
        if shared:
            x = x.expand(bsz, -1, -1)
            self_w = None if self_w is None else self_w.expand(bsz, -1, -1)
        if self.fast_path and not need_weights:
            attn, cross_w = folded_cross_attention(self.multihead_attn, x, memory, memory_pad), None
        else:
            attn, cross_w = self.multihead_attn(x, memory, memory, key_padding_mask=memory_pad,
                                                need_weights=need_weights)
        # Without autograd the fast path adds the residuals and applies the ReLU in place, into arrays
        # this layer just made.
        in_place = self.fast_path and not torch.is_grad_enabled()
        x = self.norm2(residual(dropped(self.dropout2, attn), x, in_place))
        hidden = self.linear1(x)
        hidden = torch.relu_(hidden) if in_place else F.relu(hidden)
        x = self.norm3(residual(dropped(self.dropout3, self.linear2(dropped(self.dropout, hidden))), x, in_place))
        return x, self_w, cross_w


class MLPHead(nn.Module):
    """Linear(D, hidden) - GELU - Dropout - Linear(hidden, k) that also returns each layer's input (eq. 3).

    Section 3.3 has the GELU; the dropout (0 = none) is the authors' code's.
    """

    def __init__(self, d_in: int, hidden: int, k: int, dropout: float = 0.0, activation: bool = True):
        super().__init__()
        self.activation = activation
        self.fc1 = nn.Linear(d_in, hidden)
        self.dropout = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden, k)

    def forward(self, x):
        """x (..., D) -> (logits (..., k), [x, input of fc2])."""
        h = self.fc1(x)
        h = dropped(self.dropout, F.gelu(h) if self.activation else h)
        return self.fc2(h), [x, h]


class MamiModel(nn.Module):
    """Token embedding, sequence encoder(s), optional class-query decoder and per-task MLP heads.

    Args:
        cfg: the architecture (:class:`ModelConfig`).
        text_model: a transformers ``BertModel``; its hidden size is the model's
            hidden size D. Frozen (and kept in eval mode) unless ``cfg.finetune_text``.
    """

    def __init__(self, cfg: ModelConfig, text_model: nn.Module):
        super().__init__()
        self.cfg = cfg
        tied = cfg.tied_text_embeddings and cfg.xformer_enc == "multi"
        if tied:
            # Training moves the tied tensors, so they must not be the caller's text model's.
            text_model = copy.deepcopy(text_model)
        self.text_model = text_model
        for p in text_model.parameters():
            p.requires_grad_(cfg.finetune_text)
        tcfg = text_model.config
        d = tcfg.hidden_size
        if d % cfg.num_heads:
            raise MamikitError(
                f"model config: hidden size {d} of the text model is not divisible by num_heads {cfg.num_heads}"
            )
        for token in ("cls_token_id", "sep_token_id"):
            if not 0 <= getattr(cfg, token) < tcfg.vocab_size:
                raise MamikitError(f"model config: {token} {getattr(cfg, token)} is outside the text vocabulary")
        emb = text_model.embeddings
        dims = {"clip": cfg.clip_dim, "detr": cfg.detr_dim}
        images = cfg.image_encoders
        # The token-type row BERT uses for a second segment starts every image
        # type; the text keeps row 0, so a text-only input is exactly BERT's.
        # The authors' multi encoders start theirs from row 0 (segments_as_coded).
        row = 0 if cfg.segments_as_coded and cfg.xformer_enc == "multi" else min(1, tcfg.type_vocab_size - 1)
        image_row = emb.token_type_embeddings.weight[row].detach()

        # 3.1: linear projection of every image vector into the hidden space.
        self.proj = nn.ModuleDict({b: nn.Linear(dims[b], d) for b in images})

        if cfg.xformer_enc == "shared":
            # 3.2: one token type per encoder; index len(images) is the text.
            self.token_types = nn.Embedding(len(images) + 1, d)
            with torch.no_grad():
                self.token_types.weight[: len(images)] = image_row
                self.token_types.weight[len(images)] = emb.token_type_embeddings.weight[0]
            # The authors' code puts the new type table inside the frozen BERT: it never trains.
            self.token_types.weight.requires_grad_(not cfg.segments_as_coded)
            self.embed_dropout = nn.Dropout(cfg.dropout)
        else:
            # 3.2: one PyTorch TransformerEncoder per image encoder, each with its
            # own type/position embeddings and LayerNorm started from BERT's.
            self.token_types = nn.ParameterDict({b: nn.Parameter(image_row.clone()) for b in images})
            self.positions = nn.ModuleDict()
            self.norms = nn.ModuleDict()
            for b in images:
                self.positions[b] = nn.Embedding(MAX_TOKENS[b], d)
                self.norms[b] = nn.LayerNorm(d, eps=emb.LayerNorm.eps)
                with torch.no_grad():
                    self.positions[b].weight.copy_(emb.position_embeddings.weight[: MAX_TOKENS[b]])
                    self.norms[b].load_state_dict(emb.LayerNorm.state_dict())
            if tied:
                self._tie_text_embeddings(emb, row)
            self.embed_dropout = nn.Dropout(cfg.dropout)
            # PyTorch defaults otherwise (post-norm, relu). The modules hold the
            # weights; on the fast path `packed_encoder` runs them on the real tokens only.
            self.encoders = nn.ModuleDict()
            for b in images:
                layer = nn.TransformerEncoderLayer(d, cfg.num_heads, cfg.ffn_dim, cfg.dropout, batch_first=True)
                self.encoders[b] = nn.TransformerEncoder(layer, cfg.encoder_layers, enable_nested_tensor=False)

        labels = cfg.labels
        self._label_index = {label: i for i, label in enumerate(labels)}
        self._row_plans = {}  # (dataset, device) -> the decoder's constant index tensors (`_row_plan`)
        if cfg.bert_pooler:
            if getattr(text_model, "pooler", None) is None:
                raise MamikitError("model config: bert_pooler needs a text model with its pooler (dense + tanh)")
            self.pool_dropout = nn.Dropout(0.1)  # the dropout BERT's classifiers put after the pooler
        head = dict(hidden=cfg.mlp_hidden, dropout=cfg.head_dropout, activation=cfg.head_gelu)
        if cfg.pooling == "cls":
            # 3.3 (a): multi-head MLP, one logit per label of the task.
            self.heads = nn.ModuleDict({t.name: MLPHead(d, k=len(t.labels), **head) for t in cfg.tasks})
        else:
            # 3.3 (b): decoder over one learnable query per label, then a
            # single-head MLP per task shared by the task's class queries.
            self.queries = nn.Parameter(torch.randn(len(labels), d))  # N(0, 1), as nn.Embedding
            self.decoder = nn.ModuleList(
                DecoderLayer(d, cfg.num_heads, cfg.ffn_dim, cfg.dropout, cfg.fast_path)
                for _ in range(cfg.decoder_layers)
            )
            if cfg.decoder_layer_copies:
                # nn.TransformerDecoder deep-copies one layer: all layers start equal.
                for layer in self.decoder[1:]:
                    layer.load_state_dict(self.decoder[0].state_dict())
            self.heads = nn.ModuleDict({t.name: MLPHead(d, k=1, **head) for t in cfg.tasks})
        self.train()

    def _tie_text_embeddings(self, emb, row: int) -> None:
        """Make each image encoder's positions, type and LayerNorm new parameters over the text model's own tensors.

        As the authors' ``nn.Parameter(bert_weight.detach())``: every encoder's
        parameter is its own object (its own optimiser state) over one shared
        storage, so each update moves the other encoders' weights and the text
        model's embeddings too. The whole position table is shared (weight
        decay reaches the text's positions), the type is a view of one row.
        PyTorch moves each parameter on its own, so ``model.to("cuda")`` (or a
        dtype change) ends the sharing, in the authors' code as here.
        """
        for b in self.cfg.image_encoders:
            self.positions[b] = nn.Embedding(emb.position_embeddings.num_embeddings,
                                             emb.position_embeddings.embedding_dim)
            self.positions[b].weight = nn.Parameter(emb.position_embeddings.weight.detach())
            self.norms[b].weight = nn.Parameter(emb.LayerNorm.weight.detach())
            self.norms[b].bias = nn.Parameter(emb.LayerNorm.bias.detach())
            self.token_types[b] = nn.Parameter(emb.token_type_embeddings.weight.detach()[row])

    def shares_text_embeddings(self) -> bool:
        """Whether an image encoder's embedding tensors are still the text model's (training drifts the text
        states)."""
        if not (self.cfg.tied_text_embeddings and self.cfg.xformer_enc == "multi"):
            return False
        text = self.text_model.embeddings.position_embeddings.weight.data_ptr()
        return any(self.positions[b].weight.data_ptr() == text for b in self.cfg.image_encoders)

    @property
    def labels(self) -> tuple[str, ...]:
        """Distinct labels over all tasks, first-seen order; one class query each."""
        return self.cfg.labels

    @property
    def hidden(self) -> int:
        """The model's hidden size D (the text model's)."""
        return self.text_model.config.hidden_size

    def train(self, mode: bool = True):
        """Set train/eval mode; a frozen text model stays in eval mode (no dropout) unless
        ``text_dropout_in_train``."""
        super().train(mode)
        if not self.cfg.finetune_text and not self.cfg.text_dropout_in_train:
            self.text_model.eval()
        return self

    def decoder_rows(self, dataset: str) -> tuple[tuple[str | None, str], ...]:
        """(task, label) of each decoder row for a batch of `dataset` (task None: all labels decoded together)."""
        if self.cfg.per_task_decoding:
            return tuple((t.name, label) for t in self.cfg.tasks if t.dataset == dataset for label in t.labels)
        return tuple((None, label) for label in self.labels)

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """The state dict without the frozen text model (what a checkpoint needs to keep)."""
        state = self.state_dict()
        if self.cfg.finetune_text:
            return state
        return {k: v for k, v in state.items() if not k.startswith("text_model.")}

    # ----------------------------------------------------------------- forward

    def forward(self, batch: Batch, return_attention: bool = False) -> ModelOutput:
        """Logits of the tasks of ``batch.dataset``.

        Args:
            batch: stored backbone outputs of one dataset (:class:`Batch`).
            return_attention: also return the decoder's head-averaged self- and
                cross-attention weights (slower path; same outputs).
        Returns:
            A :class:`ModelOutput`; ``projections`` holds for each image encoder
            its raw vectors f and their projection g (DETR: all stored queries
            when ``batch.detr_all`` is given, masking being for the encoder only).
        """
        tasks = [t for t in self.cfg.tasks if t.dataset == batch.dataset]
        if not tasks:
            raise MamikitError(f"batch from dataset {batch.dataset!r}: the model has no task for it")
        images, has_text = self._present(batch)
        tokens, projections = self._embed_images(batch, images)
        if self.cfg.xformer_enc == "shared":
            memory, memory_mask, segments = self._encode_shared(batch, tokens, images, has_text)
        else:
            memory, memory_mask, segments = self._encode_multi(batch, tokens, images, has_text)
        out = ModelOutput(logits={}, mlp_inputs={}, projections=projections, memory_mask=memory_mask,
                          memory_segments=segments)

        if self.cfg.pooling == "cls":
            pooled = memory[:, 0]  # (B, D) the global [CLS]
            if self.cfg.bert_pooler:
                pooled = self.pool_dropout(self._pooler(pooled))
            for task in tasks:
                logits, inputs = self.heads[task.name](pooled)
                k = len(task.labels)
                out.logits[task.name] = logits  # (B, k)
                out.mlp_inputs[task.name] = [h.unsqueeze(1).expand(-1, k, -1) for h in inputs]  # (B, k, D_l)
            return out

        # One row per (task, label): each task's own class queries (or every
        # label once when decoding jointly). Self-attention stays within a
        # task, so the one pass equals a pass per task; cross-attention is per row.
        rows = self.decoder_rows(batch.dataset)
        query_index, self_mask, task_rows = self._row_plan(batch.dataset, memory.device)
        queries = self.queries if query_index is None else self.queries.index_select(0, query_index)
        x = queries.unsqueeze(0).expand(memory.shape[0], -1, -1)  # (B, R, D)
        pad = ~memory_mask
        self_attn, cross_attn = [], []
        for layer in self.decoder:
            x, sw, cw = layer(x, memory, pad, need_weights=return_attention, self_mask=self_mask)
            self_attn.append(sw)
            cross_attn.append(cw)
        out.decoder_out, out.decoder_rows, out.queries, out.query_labels = x, rows, self.queries, self.labels
        if return_attention:
            out.self_attn, out.cross_attn = self_attn, cross_attn
        for task in tasks:
            where = task_rows[task.name]  # a slice of rows, or their index
            logits, inputs = self.heads[task.name](x[:, where] if isinstance(where, slice) else x.index_select(1, where))
            out.logits[task.name] = logits.squeeze(-1)  # (B, C_task)
            out.mlp_inputs[task.name] = inputs
        return out

    def _row_plan(self, dataset: str, device) -> tuple:
        """The decoder's constant index tensors for a batch of `dataset`, made once per dataset and device.

        Returns (index of the rows' class queries, None where they are `queries` itself in order; the (R, R)
        self-attention mask, True = another task's row, None with one task; task -> its rows
        of the decoder's output, a slice where they are consecutive, else an index tensor). Kept on the model:
        they depend on its configuration only, and making them costs a few operator launches per batch.
        """
        key = (dataset, str(device))
        plans = self._row_plans
        if key not in plans:
            rows = self.decoder_rows(dataset)
            with torch.inference_mode(False):  # plain tensors, that autograd may save (index_select's index)
                labels = [self._label_index[label] for _, label in rows]
                query_index = None if labels == list(range(len(self.labels))) else torch.tensor(labels, device=device)
                groups = [task for task, _ in rows]
                self_mask = None
                if len(set(groups)) > 1:
                    group = torch.tensor([groups.index(g) for g in groups])  # (R,) first row of each row's task
                    self_mask = (group.unsqueeze(1) != group.unsqueeze(0)).to(device)  # (R, R) True = another task's row
                task_rows = {}
                for task in (t for t in self.cfg.tasks if t.dataset == dataset):
                    owner = task.name if self.cfg.per_task_decoding else None
                    at = [rows.index((owner, label)) for label in task.labels]
                    consecutive = at == list(range(at[0], at[0] + len(at)))
                    task_rows[task.name] = slice(at[0], at[-1] + 1) if consecutive else torch.tensor(at, device=device)
            plans[key] = query_index, self_mask, task_rows
        return plans[key]

    def _present(self, batch: Batch) -> tuple[tuple[str, ...], bool]:
        """The image encoders that run on `batch` and whether its text does (section 6: one-modality datasets).

        A batch is one dataset's (algorithm 1), so a modality is in all of its memes or in none: the
        encoders of an absent one are skipped, and the decoder attends to what the others encode.
        """
        modalities = tuple(batch.modalities)
        has_text = "text" in modalities
        images = self.cfg.image_encoders if "image" in modalities else ()
        where = f"batch from dataset {batch.dataset!r} ({' and '.join(modalities) or 'no modality'})"
        if not images and not has_text:
            raise MamikitError(f"{where}: no encoder of this model reads it (image encoders "
                               f"{self.cfg.image_encoders or 'none'})")
        if not has_text and self.cfg.pooling == "txt_cls":
            raise MamikitError(f"{where}: pooling 'txt_cls' reads the text's own [CLS], which this batch lacks; "
                               "use pooling 'none'")
        if has_text and batch.text_ids is None:
            raise MamikitError(f"{where}: the batch has no text_ids")
        return images, has_text

    def _pooler(self, cls_vectors):
        """The text model's pretrained pooler, dense + tanh, on (B, D) [CLS] vectors."""
        return torch.tanh(self.text_model.pooler.dense(cls_vectors))

    def _detr_positions(self, batch: Batch, mask):
        """(B, n) 0-based position of each DETR token: its slot (``detr_slot_positions``) or its rank among kept
        ones."""
        if self.cfg.detr_slot_positions:
            if batch.detr_slots is not None:
                return batch.detr_slots.long().to(mask.device)
            return torch.arange(mask.shape[1], device=mask.device).expand(mask.shape)
        return (mask.long().cumsum(1) - 1).clamp(min=0)

    def _embed_images(self, batch: Batch, images=None):
        """3.1: project the vectors of `images` -> ({enc: (tokens (B,n,D), mask (B,n))}, {enc: (f, g)})."""
        tokens, projections = {}, {}
        for b in self.cfg.image_encoders if images is None else images:
            proj = self.proj[b]
            f = getattr(batch, b)
            if f is None:
                raise MamikitError(f"batch from dataset {batch.dataset!r} has no {b} features but the model uses {b}")
            f = f.to(proj.weight.dtype)
            g = proj(f)  # (B, n, D)
            if b == "detr":
                mask = batch.detr_mask
                if mask is None:
                    mask = torch.ones(g.shape[:2], dtype=torch.bool, device=g.device)
                mask = mask.bool()
                # packed batches (detr_slots given) were checked where they were assembled, on the host
                if batch.detr_slots is None and not mask.any(1).all():
                    raise MamikitError(f"batch from dataset {batch.dataset!r}: a meme has no DETR token left")
                # Masked tokens enter as zeros so that whatever they hold cannot leak.
                tokens[b] = (g.masked_fill(~mask.unsqueeze(-1), 0.0), mask)
                if batch.detr_all is not None and batch.detr_all is not batch.detr:
                    f = batch.detr_all.to(proj.weight.dtype)
                    g = proj(f)  # (B, 100, D)
            else:
                tokens[b] = (g, torch.ones(g.shape[:2], dtype=torch.bool, device=g.device))
            projections[b] = (f, g)
        return tokens, projections

    def _encode_shared(self, batch: Batch, tokens, images=None, has_text: bool = True):
        """3.2 shared: [CLS] + image segments each closed by [SEP] + text, through BERT's layers.

        A segment whose modality the batch lacks is left out (not zero-filled); the others keep their
        token types and positions.
        """
        images = self.cfg.image_encoders if images is None else images
        emb = self.text_model.embeddings
        ids = batch.text_ids.long() if has_text else None
        first_tokens = ids if has_text else tokens[images[0]][0]
        bsz, device = first_tokens.shape[0], first_tokens.device
        special = emb.word_embeddings(torch.tensor([self.cfg.cls_token_id, self.cfg.sep_token_id], device=device))
        cls_vec, sep_vec = special[0].expand(bsz, 1, -1), special[1].expand(bsz, 1, -1)  # (B, 1, D)
        ones = torch.ones(bsz, 1, dtype=torch.bool, device=device)
        n_img = len(self.cfg.image_encoders)
        text_type = n_img
        # Position 0 and the text's token type belong to the global [CLS], as
        # in BERT; every segment then counts its real tokens from 1, so that
        # packed and padded DETR sequences get the same positions. The authors'
        # code (segments_as_coded) counts every segment from 0 and puts an
        # image segment's [SEP] after its last slot (CLIP 5, DETR 100).
        first = 0 if self.cfg.segments_as_coded else 1
        pieces, masks = [cls_vec], [ones]
        types = [torch.full((bsz, 1), text_type, dtype=torch.long, device=device)]
        positions = [torch.zeros(bsz, 1, dtype=torch.long, device=device)]
        segments, start = {"cls": (0, 1)}, 1
        longest = max([tokens[b][0].shape[1] + 1 for b in images] + ([ids.shape[1]] if has_text else []))
        if longest > emb.position_embeddings.num_embeddings:
            raise MamikitError(
                f"batch from dataset {batch.dataset!r}: a segment of {longest} tokens is longer than the "
                f"text model's {emb.position_embeddings.num_embeddings} positions"
            )
        for t, b in enumerate(self.cfg.image_encoders):  # t: the encoder's token type, kept when another is absent
            if b not in images:
                continue
            x, mask = tokens[b]  # (B, n, D), (B, n)
            n = x.shape[1]
            pieces += [x, sep_vec]
            masks += [mask, ones]
            types.append(torch.full((bsz, n + 1), t, dtype=torch.long, device=device))
            if b == "detr":
                rank = self._detr_positions(batch, mask) + first  # (B, n) slot or rank, counted from `first`
            else:
                rank = mask.long().cumsum(1) - 1 + first  # (B, n) rank among real tokens, counted from `first`
            rank = rank * mask
            if self.cfg.segments_as_coded:
                sep = torch.full((bsz, 1), MAX_TOKENS[b], dtype=torch.long, device=device)
            else:
                sep = rank.max(1, keepdim=True).values + 1
            positions += [rank, sep]
            segments[b] = (start, start + n + 1)
            start += n + 1
        if has_text:
            # The text without its own [CLS] (the global one replaces it), with its [SEP].
            text_ids, text_mask = ids[:, 1:], batch.text_mask[:, 1:].bool()
            n = text_ids.shape[1]
            pieces.append(emb.word_embeddings(text_ids))
            masks.append(text_mask)
            types.append(torch.full((bsz, n), text_type, dtype=torch.long, device=device))
            positions.append(torch.arange(first, n + first, device=device).expand(bsz, n))
            segments["text"] = (start, start + n)

        x = torch.cat(pieces, 1)  # (B, S, D)
        mask = torch.cat(masks, 1)  # (B, S)
        types, positions = torch.cat(types, 1), torch.cat(positions, 1)  # (B, S)
        x = x + self.token_types(types) + emb.position_embeddings(positions)
        x = self.embed_dropout(emb.LayerNorm(x))
        try:  # imported here: transformers' masking module pulls in torch._dynamo (seconds at start-up)
            from transformers.masking_utils import create_bidirectional_mask
        except ImportError:  # transformers 4: BERT's layers take the additive (B, 1, 1, S) mask
            attn_mask = self.text_model.get_extended_attention_mask(mask.long(), mask.shape)
        else:
            attn_mask = create_bidirectional_mask(config=self.text_model.config, inputs_embeds=x, attention_mask=mask)
        x = self.text_model.encoder(x, attention_mask=attn_mask).last_hidden_state  # (B, S, D)
        return x, mask, segments

    def _encode_text(self, batch: Batch):
        """Text states (B, T, D) from the cache when the text model is frozen, else from the text model."""
        # the cached states were computed without dropout
        dropout_on = self.cfg.text_dropout_in_train and self.training
        # Tied embeddings move the text model's input embeddings: the cached states are stale.
        stale = dropout_on or self.shares_text_embeddings()
        if not self.cfg.finetune_text and batch.text_hidden is not None and not stale:
            return batch.text_hidden.to(self.text_model.embeddings.word_embeddings.weight.dtype)
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.cfg.finetune_text):
            out = self.text_model(input_ids=batch.text_ids.long(), attention_mask=batch.text_mask.long())
            return out.last_hidden_state

    def _encode_multi(self, batch: Batch, tokens, images=None, has_text: bool = True):
        """3.2 multi: one encoder per image sequence, BERT for the text, outputs concatenated (those present)."""
        images = self.cfg.image_encoders if images is None else images
        outs, masks, segments, start = [], [], {}, 0
        for b in images:
            x, mask = tokens[b]  # (B, n, D), (B, n)
            if x.shape[1] > MAX_TOKENS[b]:
                raise MamikitError(f"batch from {batch.dataset!r}: {x.shape[1]} {b} tokens, at most {MAX_TOKENS[b]}")
            if b == "detr":
                positions = self._detr_positions(batch, mask)  # (B, n) 0-based slot or rank
            else:
                positions = (mask.long().cumsum(1) - 1).clamp(min=0)  # (B, n) 0-based rank among real tokens
            x = x + self.token_types[b] + self.positions[b](positions)
            x = dropped(self.embed_dropout, self.norms[b](x))
            if self.cfg.fast_path:
                # CLIP's tokens are all real (known here, no read of the mask); DETR's gathered
                x = packed_encoder(self.encoders[b], x, mask, full=b == "clip")  # (B, n, D), padding zero
            else:
                x = self.encoders[b](x, src_key_padding_mask=~mask)  # (B, n, D), the stock module on the grid
            outs.append(x)
            masks.append(mask)
            segments[b] = (start, start + x.shape[1])
            start += x.shape[1]
        if has_text:
            text = self._encode_text(batch)  # (B, T, D)
            text_mask = batch.text_mask.bool()
            if self.cfg.pooling == "txt_cls":
                text, text_mask = text[:, :1], text_mask[:, :1]  # the text's own [CLS]
                if self.cfg.bert_pooler:
                    text = self._pooler(text)  # BERT's pooler_output
            outs.append(text)
            masks.append(text_mask)
            segments["text"] = (start, start + text.shape[1])
        return torch.cat(outs, 1), torch.cat(masks, 1), segments


def param_groups(model: nn.Module, weight_decay: float, by_name: bool = False) -> list[dict]:
    """Optimizer groups: weight decay on every trainable parameter except biases and LayerNorm weights.

    Section 4: "For all parameters except biases and layer normalization
    weights, we have used a weight decay". Embeddings and class queries are
    decayed. Frozen parameters (the text model unless fine-tuned) are left out.
    `by_name` spares only the LayerNorms the authors' code finds by the name
    ``LayerNorm.weight``: the embedding LayerNorms started from BERT's
    (``norms.*``); the encoder and decoder layers' norm1/2/3 are decayed.
    """
    no_decay = set()
    for name, module in model.named_modules():
        if isinstance(module, nn.LayerNorm) and (not by_name or name.startswith("norms.")):
            no_decay.update(id(p) for p in module.parameters(recurse=False))
    decay, plain = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if id(p) in no_decay or name.endswith("bias"):
            plain.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]
