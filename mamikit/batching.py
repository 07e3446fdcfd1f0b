"""Batch assembly from the feature store, and the multi-task batch sampler (algorithm 1).

The fast path packs each batch to what it really holds: only the DETR queries
kept by the no-object rule of section 3.1 and only the real text tokens, padded
to the longest meme of the batch rather than to 100 queries and 120 tokens.
Rows are gathered by slicing the store's memory-mapped arrays, never by reading
one file per meme. `pack=False` gives the straightforward padded layout, kept
as the yardstick of `bench/train_throughput.py`.

A dataset of one modality (mamikit/tasks.json: a text-only corpus, an
image-only set) has features of that modality only; its SplitData says which
(`modalities`), and its batches carry nothing of the other: no zero-filled
stand-ins (the model skips the absent encoders).

A split that cuts across the store's files (the authors' train/dev split,
row 13 of docs/fidelity.md) reads them as one through :func:`pool_features`,
without copying them; :func:`text_length_note` says when the store's text
length is not the one a run expects (row 11).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .model import Batch
from .store import SplitFeatures
from .utils import MamikitError


@dataclass
class SplitData:
    """The memes of one (dataset, split) that have features, with their targets."""

    dataset: str
    split: str
    ids: list[str]  # meme ids, aligned with `rows` and `targets`
    rows: np.ndarray  # (N,) row of each meme in the feature store
    targets: np.ndarray  # (N, L) float32: 0/1, or -1 where the label is unknown
    labels: tuple[str, ...]  # the dataset's labels, columns of `targets`
    features: object  # features.SplitFeatures (memory-mapped)
    modalities: tuple[str, ...] = ("image", "text")  # what the dataset holds (registry.dataset_modalities)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def labelled(self) -> bool:
        """Whether any target is known (an unlabelled test set is not scored)."""
        return bool((self.targets >= 0).any())


class _Stacked:
    """Tensors read as one, stacked along dim 0, without copying: indexing with a LongTensor gathers rows."""

    def __init__(self, parts: list[torch.Tensor]):
        self.parts = parts
        lengths = torch.tensor([len(p) for p in parts], dtype=torch.long)
        self.ends = lengths.cumsum(0)  # (P,)
        self.starts = self.ends - lengths
        self.shape = (int(self.ends[-1]), *parts[0].shape[1:])
        self.dtype = parts[0].dtype

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index: torch.Tensor) -> torch.Tensor:
        index = torch.as_tensor(index, dtype=torch.long)
        part = torch.searchsorted(self.ends, index, right=True)  # (K,) which part holds each row
        out = torch.empty((len(index), *self.shape[1:]), dtype=self.dtype)
        for k, tensor in enumerate(self.parts):
            sel = (part == k).nonzero().squeeze(1)
            if len(sel):
                out[sel] = tensor[index[sel] - self.starts[k]]
        return out


def pool_features(parts: list[SplitFeatures]) -> SplitFeatures:
    """Several files' features read as one split (rows in the order of `parts`), nothing copied but the text
    offsets."""
    out = SplitFeatures(ids=[m for p in parts for m in p.ids])
    for name in ("clip", "detr", "detr_mask", "detr_logits", "text_ids", "text_hidden"):
        arrays = [getattr(p, name) for p in parts]
        if all(a is not None for a in arrays):
            setattr(out, name, _Stacked(arrays))
    if all(p.text_offsets is not None for p in parts):
        # Each file's offsets count its own tokens: shift them past the files before it.
        shifted, base = [], 0
        for p in parts:
            shifted.append(p.text_offsets[:-1] + base)
            base += int(p.text_offsets[-1])
        out.text_offsets = torch.cat(shifted + [torch.tensor([base], dtype=torch.long)])
    return out


def text_length_note(data: dict, stored: int | None, wanted: int | None) -> str:
    """Why the stored text differs from a run's expected length (row 11), or "" where no meme is affected.

    Args:
        data: (dataset, split) -> :class:`SplitData`.
        stored: the store's truncation length, [CLS] and [SEP] included.
        wanted: the length the run expects (``Experiment.text_tokens``); None = the store's.
    """
    if wanted is None or stored is None or wanted == stored:
        return ""
    affected = 0
    for split in data.values():
        if "text" not in split.modalities:
            continue
        offsets = split.features.text_offsets.numpy()
        lengths = offsets[split.rows + 1] - offsets[split.rows]
        # A shorter store cut the memes that fill it; a longer one kept tokens the run would cut.
        affected += int((lengths >= stored).sum() if stored < wanted else (lengths > wanted).sum())
    if not affected:
        return ""
    return (f"the feature store cut the text at {stored} tokens ([CLS] and [SEP] included), the experiment expects "
            f"{wanted}: {affected} meme(s) reach the shorter length and may read other text than the recipe's; "
            f"extract the store with the profile's "
            f"max_text_tokens={wanted} to match it")


def _pack_detr(detr: torch.Tensor, mask: torch.Tensor, ids=()) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Move each meme's kept queries to the front and cut to the batch's largest count -> (detr, mask, slots).

    A meme with no kept query is refused here, on the host (the model does not check packed batches again).
    """
    keep = mask.bool()  # (B, 100)
    counts = keep.sum(1)  # (B,)
    if not bool(counts.all()):
        empty = [ids[i] for i in (counts == 0).nonzero().flatten().tolist() if i < len(ids)]
        raise MamikitError(f"DETR features: meme(s) {', '.join(empty[:5]) or '?'} keep no DETR query; the "
                           "no-object rule (section 3.1) keeps at least one per meme: re-extract the store")
    q = max(int(counts.max()), 1)
    # A stable sort on "not kept" puts kept queries first, in their original order.
    order = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices[:, :q]  # (B, q)
    packed = torch.gather(detr, 1, order.unsqueeze(-1).expand(-1, -1, detr.shape[-1]))  # (B, q, D)
    return packed, torch.gather(keep, 1, order), order  # order: each token's DETR slot 0..99


def _gather_text(features, rows: np.ndarray, pad_to: int | None, with_hidden: bool):
    """Ragged text rows -> padded (B, T) ids, (B, T) mask and optionally (B, T, D) states."""
    offsets = features.text_offsets.numpy()
    starts, ends = offsets[rows], offsets[rows + 1]
    lengths = ends - starts  # (B,)
    t = int(lengths.max()) if pad_to is None else max(pad_to, int(lengths.max()))
    pos = np.arange(t)[None, :]  # (1, T)
    mask = pos < lengths[:, None]  # (B, T)
    flat = np.where(mask, starts[:, None] + pos, 0)  # (B, T) index into the ragged arrays
    flat_t = torch.from_numpy(flat.reshape(-1))
    mask_t = torch.from_numpy(mask)
    ids = features.text_ids[flat_t].reshape(flat.shape).long() * mask_t
    hidden = None
    if with_hidden:
        hidden = features.text_hidden[flat_t].float().reshape(*flat.shape, -1) * mask_t.unsqueeze(-1)
    return ids, mask_t, hidden


def make_batch(data: SplitData, index: np.ndarray, image_encoders=("clip", "detr"), pack: bool = True,
               text_hidden: bool = True, detr_all: bool = False, max_text_tokens: int = 120) -> Batch:
    """Assemble the memes at positions `index` of `data` into a model Batch.

    Args:
        data: the split.
        index: positions into `data` (not store rows).
        image_encoders: image encoders to include (none when the data holds no image).
        pack: pack DETR to kept queries and text to real tokens (fast path);
            False pads to 100 queries and `max_text_tokens` tokens.
        text_hidden: include the cached text-encoder states (frozen text encoder).
        detr_all: include all 100 stored queries (needed by projection alignment, eq. 2).
        max_text_tokens: padding length of the unpacked layout.
    Returns:
        A Batch on the CPU.
    """
    index = np.asarray(index)
    rows = data.rows[index]
    rows_t = torch.from_numpy(rows)
    f = data.features
    image_encoders = image_encoders if "image" in data.modalities else ()
    # Fancy indexing a tensor over a memmap copies just these rows, in one call per array.
    clip = f.clip[rows_t].float() if "clip" in image_encoders else None  # (B, 5, Dc)
    detr = detr_mask = detr_full = detr_slots = None
    if "detr" in image_encoders:
        stored = f.detr[rows_t]  # (B, 100, Dd) in the store's dtype
        mask = f.detr_mask[rows_t].bool()  # (B, 100)
        if pack:
            detr, detr_mask, detr_slots = _pack_detr(stored, mask, [data.ids[i] for i in index])
            detr = detr.float()
            detr_full = stored.float() if detr_all else None
        else:
            detr, detr_mask = stored.float(), mask
            detr_full = detr  # the same tensor: the model projects it once
    ids = text_mask = hidden = None
    if "text" in data.modalities:
        ids, text_mask, hidden = _gather_text(f, rows, None if pack else max_text_tokens, text_hidden)
    return Batch(
        dataset=data.dataset,
        ids=[data.ids[i] for i in index],
        labels=data.labels,
        targets=torch.from_numpy(data.targets[index]),
        clip=clip,
        detr=detr,
        detr_mask=detr_mask,
        detr_all=detr_full if detr_all and detr_full is not None else None,
        text_ids=ids,
        text_mask=text_mask,
        text_hidden=hidden,
        detr_slots=detr_slots,
        modalities=tuple(data.modalities),
    )


def epoch_batches(sizes: dict[str, int], batch_size: int, rng: np.random.Generator) -> list[tuple[str, np.ndarray]]:
    """One epoch of algorithm 1: every batch from one dataset, every sample exactly once.

    Each dataset's samples are shuffled and cut into batches; the next batch's
    dataset is drawn uniformly among the datasets with batches left.

    Args:
        sizes: dataset name -> number of training samples.
        batch_size: samples per batch (the last batch of a dataset may be smaller).
        rng: the generator that fixes the order.
    Returns:
        A list of (dataset, positions) pairs.
    """
    queues = {}
    for name in sorted(sizes):
        perm = rng.permutation(sizes[name])
        queues[name] = [perm[i:i + batch_size] for i in range(0, sizes[name], batch_size)]
    out = []
    while any(queues.values()):
        left = [name for name in sorted(queues) if queues[name]]
        name = left[int(rng.integers(len(left)))]
        out.append((name, queues[name].pop(0)))
    return out
