"""Feature store: the on-disk form of the frozen backbones' outputs (section 3.1), and its reader.

Section 4: "we pre-generated and stored each backbone output instead of
re-evaluating the same data across epochs and experiments". The store is::

    STORE/manifest.json                          profile, backbones, weights, preprocessing, dims,
                                                 dtype, split_seed, rows, skipped memes
    STORE/<dataset>/<split>/<backbone>.safetensors
    STORE/<dataset>/<split>/<backbone>.ids.txt   one id per line, the file's row order (sorted)

    clip:  embeds (N, 5, Dc)
    detr:  embeds (N, 100, Dd), logits (N, 100, 92), mask (N, 100) uint8 (paper's object mask)
    text:  input_ids (T,) int32, hidden (T, Dt), offsets (N + 1,) int64 -- ragged: meme i owns
           token rows offsets[i]:offsets[i + 1], [CLS] and [SEP] included

A profile with detector none writes no detr files; its manifest says
``"detector": "none"``.

Stores of several profiles live side by side under one features root,
``<features_root>/<profile>/`` (:func:`store_dir`), unless the root holds a
store itself (``<features_root>/manifest.json``, the layout of stores written
before profiles were many): then that store is the one every profile reads,
and training refuses it for a profile it was not extracted with.

A dataset of one modality (section 6: a text-only corpus) has only its
backbones' files; each split's manifest entry records the modalities it
holds (``"modalities": ["text"]``; absent in older stores: image and text),
and :meth:`FeatureStore.load` refuses, naming them, backbones of another.

Floating arrays are float16 unless asked otherwise. This module is the only
one that reads or writes these files: `mamikit.extraction` fills a store through
`write_backbone` and the manifest functions, `FeatureStore(root).load(dataset,
split)` memory-maps the files (no read per meme) into a :class:`SplitFeatures`,
and `write_split` writes a whole split from arrays already in memory.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .utils import MamikitError, atomic_write, file_sha256, read_json, write_json

try:
    from . import __version__
except ImportError:  # imported as a namespace package (broken editable install)
    from importlib.metadata import version

    __version__ = version("mamikit")

STORE_FORMAT = "mamikit-feature-store/1"
MANIFEST = "manifest.json"
NO_DETECTOR = "none"  # the manifest's "detector" of a profile without DETR
BACKBONES = ("clip", "detr", "text")  # extraction and loading order
DTYPES = {"float16": np.float16, "float32": np.float32}  # precisions a store may hold its features in
# per file, in order
ARRAYS = {"clip": ("embeds",), "detr": ("embeds", "logits", "mask"), "text": ("input_ids", "hidden", "offsets")}
MODALITY_OF = {"clip": "image", "detr": "image", "text": "text"}  # the modality each backbone reads


# ---------------------------------------------------------------------------- safetensors I/O

_ST_DTYPES = {"F16": np.float16, "F32": np.float32, "F64": np.float64, "I32": np.int32, "I64": np.int64,
              "U8": np.uint8, "BOOL": np.bool_}
_NP_TO_ST = {np.dtype(v): k for k, v in _ST_DTYPES.items()}


def write_safetensors(path, tensors: dict[str, list[np.ndarray]], metadata: dict | None = None) -> int:
    """Write arrays, each given as pieces joined along axis 0, as one safetensors file, atomically.

    Streams piece by piece (pieces may be memory-mapped), so merging large
    chunks never holds a whole split in memory. Returns the file size.
    """
    header, offset, ordered = {}, 0, []
    for name, pieces in tensors.items():
        pieces = [np.ascontiguousarray(p, dtype=np.asarray(p).dtype.newbyteorder("<")) for p in pieces]
        dtype, tail = pieces[0].dtype, pieces[0].shape[1:]
        if any(p.dtype != dtype or p.shape[1:] != tail for p in pieces):
            raise MamikitError(f"{path}: pieces of {name} differ in dtype or shape")
        rows = sum(p.shape[0] for p in pieces)
        nbytes = rows * math.prod(tail) * dtype.itemsize
        header[name] = {"dtype": _NP_TO_ST[dtype.newbyteorder("=")], "shape": [rows, *tail],
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
        ordered.append(pieces)
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # align the data to 8 bytes, like the safetensors library
    with atomic_write(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)))
        fh.write(raw)
        for pieces in ordered:
            for p in pieces:
                if p.size:
                    fh.write(memoryview(p.reshape(-1)).cast("B"))
    return 8 + len(raw) + offset


def read_safetensors(path, names=None) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Memory-map the arrays of a safetensors file -> ({name: array}, metadata).

    Parses the header itself (8-byte little-endian length, JSON) and checks that
    every array lies inside the file; a truncated or corrupt file raises
    MamikitError naming it. Arrays are copy-on-write maps: nothing is read
    until used, and writing to them never touches the file.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise MamikitError(f"{path}: file not found") from None
    if size < 8:
        raise MamikitError(f"{path}: truncated ({size} bytes, no header)")
    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        if n > size - 8:
            raise MamikitError(f"{path}: truncated (header of {n} bytes, file of {size})")
        raw = fh.read(n)
    try:
        header = json.loads(raw)
        meta = header.pop("__metadata__", None) or {}
        arrays = {}
        for name, info in header.items():
            dtype = np.dtype(_ST_DTYPES[info["dtype"]])
            shape = tuple(int(s) for s in info["shape"])
            start, end = (int(x) for x in info["data_offsets"])
            if end - start != math.prod(shape) * dtype.itemsize:
                raise MamikitError(f"{path}: array {name} of shape {shape} does not match its byte range")
            if 8 + n + end > size:
                raise MamikitError(f"{path}: truncated (array {name} ends at byte {8 + n + end}, file has {size})")
            if names is not None and name not in names:
                continue
            if math.prod(shape) == 0:
                arrays[name] = np.zeros(shape, dtype)
            else:
                arrays[name] = np.memmap(path, dtype=dtype, mode="c", offset=8 + n + start, shape=shape)
    except MamikitError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise MamikitError(f"{path}: not a valid safetensors file ({type(exc).__name__}: {exc})") from None
    return arrays, meta


# ---------------------------------------------------------------------------- manifest and files


def store_dir(features_root, profile_name: str) -> Path:
    """The store of one profile under a features root: `<features_root>/<profile_name>`.

    A features root that holds a store itself (its own manifest.json: a store written there directly, as
    before profiles lived side by side) is that store, whatever the profile; training then checks that
    the store was extracted with the profile it asks for (`train.check_store_profile`).
    """
    root = Path(features_root)
    if (root / MANIFEST).is_file():
        return root
    return root / profile_name



def new_manifest(profile_name: str, dtype: str, split_seed: int) -> dict:
    """The manifest of an empty store: no backbone recorded, no split written."""
    return {"format": STORE_FORMAT, "mamikit_version": __version__, "profile": profile_name, "split_seed": split_seed,
            "dtype": dtype, "complete": False, "backbones": {}, "datasets": {}}


def read_manifest(root, *, missing_ok: bool = False) -> dict | None:
    """STORE/manifest.json, checked to be a feature store's; None if absent and `missing_ok`."""
    root = Path(root)
    path = root / MANIFEST
    if not path.is_file():
        if missing_ok:
            return None
        raise MamikitError(
            f"{root}: not a feature store (no {MANIFEST}); fill it with "
            f"`python -m mamikit extract --data DIR --out {root}`"
        )
    manifest = read_json(path)
    found = manifest.get("format") if isinstance(manifest, dict) else None
    if found != STORE_FORMAT:
        raise MamikitError(f"{path}: unknown store format {found!r} (expected {STORE_FORMAT})")
    return manifest


def write_manifest(root, manifest: dict) -> None:
    """Write STORE/manifest.json atomically, stamped with this mamikit's version."""
    manifest["mamikit_version"] = __version__
    write_json(Path(root) / MANIFEST, manifest)


def store_dtype(manifest: dict) -> str:
    """The precision the store's floating features are held in ("float16" or "float32")."""
    return manifest.get("dtype", "float16")


def split_folder(root, dataset: str, split: str) -> Path:
    """STORE/<dataset>/<split>: where one split's files live."""
    return Path(root) / dataset / split


def discard_unfinished_writes(root, dataset: str | None = None, split: str | None = None,
                              backbone: str | None = None) -> None:
    """Remove the temporary files of writes killed before their rename: the manifest's, or one backbone's files'."""
    if dataset is None:
        folder, prefix = Path(root), f".{MANIFEST}."
    else:
        folder, prefix = split_folder(root, dataset, split), f".{backbone}."
    for stale in folder.glob(f"{prefix}*.tmp"):
        stale.unlink()


def read_ids(path) -> list[str]:
    """The meme ids of an ids file, one per line, in the rows' order."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise MamikitError(f"{path}: file not found") from None
    return text.split("\n")[:-1] if text else []


def is_intact(root, info: dict) -> bool:
    """Whether a manifest entry's files are both there and the array file has its recorded size."""
    root = Path(root)
    path = root / info["file"]
    return path.is_file() and path.stat().st_size == info.get("bytes") and (root / info["ids_file"]).is_file()


def write_backbone(root, dataset: str, split: str, backbone: str, tensors: dict[str, list[np.ndarray]],
                   ids: list[str]) -> dict:
    """Write one backbone's file of a split and its ids file, each atomically -> its manifest entry.

    Args:
        tensors: {array name: pieces joined along axis 0}, the names of ARRAYS[backbone].
        ids: the meme of each row, in order.
    Returns:
        {"file", "ids_file", "rows", "bytes", "complete", "arrays"}; the caller records it in the manifest.
    """
    root = Path(root)
    folder = split_folder(root, dataset, split)
    final = folder / f"{backbone}.safetensors"
    ids_file = folder / f"{backbone}.ids.txt"
    nbytes = write_safetensors(final, tensors, {"format": STORE_FORMAT, "backbone": backbone, "dataset": dataset,
                                                "split": split, "rows": len(ids)})
    with atomic_write(ids_file, "w") as fh:
        fh.write("".join(f"{m}\n" for m in ids))
    return {
        "file": str(final.relative_to(root)), "ids_file": str(ids_file.relative_to(root)), "rows": len(ids),
        "bytes": nbytes, "sha256": file_sha256(final), "complete": True,
        "arrays": {n: [str(a.dtype), *a.shape] for n, a in read_safetensors(final)[0].items()},
    }


def write_split(root, dataset: str, split: str, ids: list[str], arrays: dict[str, dict], *,
                profile: str = "", split_seed: int = 0, modalities=None) -> int:
    """Write one split's features, already in memory, into a store (one writer at a time: no lock) -> bytes written.

    Args:
        root: the store folder; created, or added to if it already holds a store.
        ids: the meme of each row, in order.
        arrays: {backbone: {array name: array, or pieces joined along axis 0}} in the
            layout of the module docstring, e.g. {"clip": {"embeds": (N, 5, Dc)}}.
        profile: profile name recorded in a new manifest.
        split_seed: split seed recorded in a new manifest.
        modalities: what the split's memes hold, e.g. ("text",); None records nothing (image and text).
    """
    unknown = [n for n in arrays if n not in BACKBONES]
    if unknown or not arrays:
        raise MamikitError(f"unknown backbone(s) {', '.join(unknown) or '(none)'}; choose from {', '.join(BACKBONES)}")
    pieces = {name: {k: v if isinstance(v, (list, tuple)) else [v] for k, v in named.items()}
              for name, named in arrays.items()}
    for name, named in pieces.items():
        missing = [k for k in ARRAYS[name] if k not in named]
        if missing:
            raise MamikitError(f"{dataset}/{split}: {name} lacks array(s) {', '.join(missing)}")
    features = {name: named["hidden" if name == "text" else "embeds"][0] for name, named in pieces.items()}  # (..., D)
    dtype = np.dtype(next(iter(features.values())).dtype).name
    manifest = read_manifest(root, missing_ok=True) or new_manifest(profile, dtype, split_seed)
    if store_dtype(manifest) != dtype:
        raise MamikitError(f"{root}: holds {store_dtype(manifest)} features, these are {dtype}")
    entry = manifest["datasets"].setdefault(dataset, {}).setdefault(split, {"backbones": {}})
    if modalities is not None:
        outside = [n for n in arrays if MODALITY_OF[n] not in modalities]
        if outside:
            raise MamikitError(f"{dataset}/{split}: holds {' and '.join(modalities)} only; "
                               f"no {', '.join(outside)} features for it")
        entry["modalities"] = [m for m in ("image", "text") if m in modalities]
    total = 0
    for name, named in pieces.items():
        info = write_backbone(root, dataset, split, name, {k: named[k] for k in ARRAYS[name]}, ids)
        manifest["backbones"].setdefault(name, {"dim": int(features[name].shape[-1])})
        entry["backbones"][name] = info
        total += info["bytes"]
    manifest["complete"] = True
    write_manifest(root, manifest)
    return total


# ---------------------------------------------------------------------------- loading


@dataclass
class SplitFeatures:
    """Backbone outputs of one split, row-aligned with `ids` (memory-mapped from the store)."""

    ids: list[str]  # sorted
    clip: torch.Tensor | None = None  # (N, 5, Dc)
    detr: torch.Tensor | None = None  # (N, 100, Dd)
    detr_mask: torch.Tensor | None = None  # (N, 100) bool, True = object token (section 3.1)
    text_ids: torch.Tensor | None = None  # (T,) int32, ragged, [CLS] ... [SEP] per meme
    text_hidden: torch.Tensor | None = None  # (T, Dt), ragged like text_ids
    text_offsets: torch.Tensor | None = None  # (N + 1,) int64: meme i owns rows offsets[i]:offsets[i+1]
    detr_logits: torch.Tensor | None = None  # (N, 100, 92), last = no-object

    def __len__(self) -> int:
        return len(self.ids)

    def rows(self, ids) -> np.ndarray:
        """Row index of each id; KeyError naming the ids that are not in the split."""
        index = self.__dict__.get("_index")
        if index is None:
            index = self.__dict__["_index"] = {m: i for i, m in enumerate(self.ids)}
        ids = [str(m) for m in ids]
        missing = [m for m in ids if m not in index]
        if missing:
            raise KeyError(f"{len(missing)} id(s) without features: {', '.join(missing[:10])}")
        return np.fromiter((index[m] for m in ids), dtype=np.int64, count=len(ids))


class FeatureStore:
    """A feature store written by `extract`, opened for training."""

    def __init__(self, root):
        self.root = Path(root)
        self.manifest = read_manifest(self.root)

    @property
    def profile_name(self) -> str:
        return self.manifest.get("profile", "")

    @property
    def has_detector(self) -> bool:
        """False for a store of a profile with detector none (its manifest says so); True otherwise."""
        return self.manifest.get("detector") != NO_DETECTOR

    @property
    def dtype(self) -> str:
        """The precision of the stored floating features ("float16" or "float32")."""
        return store_dtype(self.manifest)

    @property
    def dims(self) -> dict[str, int]:
        """Feature size per extracted backbone: {"clip": Dc, "detr": Dd, "text": Dt}."""
        return {name: int(spec["dim"]) for name, spec in self.manifest.get("backbones", {}).items()}

    @property
    def special_ids(self) -> tuple[int, int] | None:
        """([CLS], [SEP]) ids of the tokenizer the text was extracted with; None for stores written before they
        were kept."""
        text = self.manifest.get("backbones", {}).get("text", {})
        if text.get("cls_token_id") is None or text.get("sep_token_id") is None:
            return None
        return int(text["cls_token_id"]), int(text["sep_token_id"])

    def entries(self) -> list[tuple[str, str, str, dict]]:
        """(dataset, split, backbone, manifest entry) of every backbone file the manifest records."""
        return [
            (ds, sp, name, info)
            for ds, splits in self.manifest.get("datasets", {}).items()
            for sp, entry in splits.items()
            for name, info in entry.get("backbones", {}).items()
        ]

    def splits(self) -> list[tuple[str, str]]:
        """(dataset, split) pairs with at least one complete backbone file."""
        return [
            (ds, sp)
            for ds, splits in self.manifest.get("datasets", {}).items()
            for sp, entry in splits.items()
            if any(b.get("complete") for b in entry.get("backbones", {}).values())
        ]

    def modalities(self, dataset: str, split: str) -> tuple[str, ...]:
        """What a split's memes hold, as extraction recorded it: ("image", "text") (also for older stores),
        ("text",) or ("image",)."""
        entry = self.manifest.get("datasets", {}).get(dataset, {}).get(split) or {}
        return tuple(entry.get("modalities") or ("image", "text"))

    def load(self, dataset: str, split: str, backbones=None) -> SplitFeatures:
        """Memory-map one split's features.

        Args:
            dataset: e.g. "MAMI".
            split: "train", "dev" or "test".
            backbones: subset of clip/detr/text; None = every complete one.
        Returns:
            SplitFeatures with the arrays as torch tensors over the files (no copy).
        """
        entry = self.manifest.get("datasets", {}).get(dataset, {}).get(split)
        if entry is None:
            held = ", ".join(f"{d}/{s}" for d, s in self.splits()) or "nothing"
            raise MamikitError(f"{self.root}: no features for {dataset}/{split} (the store holds {held})")
        done = entry.get("backbones", {})
        names = [n for n in BACKBONES if done.get(n, {}).get("complete")] if backbones is None else list(backbones)
        held = self.modalities(dataset, split)
        outside = [n for n in names if n in MODALITY_OF and MODALITY_OF[n] not in held]
        if outside:
            raise MamikitError(f"{self.root}: {dataset}/{split} holds {' and '.join(held)} only "
                               f"(mamikit/tasks.json's modalities), so it has no {', '.join(outside)} features")
        out = SplitFeatures(ids=[])
        ids_seen: tuple[str, list[str]] | None = None
        for name in names:
            info = done.get(name)
            if name not in BACKBONES:
                raise MamikitError(f"unknown backbone {name!r}; choose from {', '.join(BACKBONES)}")
            if not info or not info.get("complete"):
                raise MamikitError(f"{self.root}: {name} features of {dataset}/{split} are not complete; "
                                   "re-run `python -m mamikit extract`")
            path = self.root / info["file"]
            arrays, _ = read_safetensors(path)
            ids = read_ids(self.root / info["ids_file"])
            self._validate(path, name, arrays, ids, info)
            if ids_seen is not None and ids != ids_seen[1]:
                raise MamikitError(f"{path} and {ids_seen[0]} hold different memes; "
                                   f"re-extract {dataset}/{split} into a fresh store")
            ids_seen = (str(path), ids)
            if name == "clip":
                out.clip = torch.from_numpy(arrays["embeds"])
            elif name == "detr":
                out.detr = torch.from_numpy(arrays["embeds"])
                out.detr_logits = torch.from_numpy(arrays["logits"])
                out.detr_mask = torch.from_numpy(arrays["mask"].view(np.bool_))
            else:
                out.text_ids = torch.from_numpy(arrays["input_ids"])
                out.text_hidden = torch.from_numpy(arrays["hidden"])
                out.text_offsets = torch.from_numpy(arrays["offsets"])
        out.ids = ids_seen[1] if ids_seen else []
        return out

    def _validate(self, path: Path, name: str, arrays: dict, ids: list[str], info: dict) -> None:
        missing = [k for k in ARRAYS[name] if k not in arrays]
        if missing:
            raise MamikitError(f"{path}: missing array(s) {', '.join(missing)}")
        n = int(info["rows"])
        rows = arrays["offsets"].shape[0] - 1 if name == "text" else arrays["embeds"].shape[0]
        if rows != n or len(ids) != n:
            raise MamikitError(f"{path}: {rows} rows and {len(ids)} ids, the manifest says {n}")
        dim = self.dims.get(name)
        feat = arrays["hidden"] if name == "text" else arrays["embeds"]
        if dim is not None and feat.shape[-1] != dim:
            raise MamikitError(f"{path}: features of size {feat.shape[-1]}, the manifest says {dim}")
        if name == "text" and n and int(arrays["offsets"][-1]) != arrays["input_ids"].shape[0]:
            raise MamikitError(f"{path}: offsets end at {int(arrays['offsets'][-1])}, "
                               f"{arrays['input_ids'].shape[0]} tokens stored")


# ----------------------------------------------------------------------------- a local copy to train from

COPY_RECORD = "copied.json"  # in a local copy: the files verified so far, with their sizes and hashes
CHUNK = 1 << 22


def store_files(manifest: dict) -> list[tuple[str, int | None, str | None]]:
    """(path relative to the store, bytes, sha256) of every file a manifest records, the ids files included."""
    files = []
    for splits in manifest.get("datasets", {}).values():
        for entry in splits.values():
            for info in entry.get("backbones", {}).values():
                if info.get("complete"):
                    files.append((info["file"], info.get("bytes"), info.get("sha256")))
                    files.append((info["ids_file"], None, None))
    return files


def local_copy(root, local_root=None, progress: bool = False) -> Path:
    """A verified copy of a feature store on local disk, made or completed now -> the copy's folder.

    On Colab the store lives on Drive, whose mount reads thousands of small slices slowly; training reads
    this copy instead (``TrainConfig.local_store``). The copy is made once per machine and resumes where an
    earlier one stopped: a file counts as copied once its size and SHA-256 were checked (against the
    manifest's where it records them, else against the bytes read from the source) and noted in the copy's
    ``copied.json``. The manifest is copied last, so a copy that stopped part-way is never opened as a store.
    The source stays the store of record; a changed source manifest (e.g. a split extracted since) copies
    what changed.

    Args:
        root: the feature store (e.g. on Drive).
        local_root: the local folder to copy under; None: $MAMIKIT_LOCAL or the temp folder.
        progress: a progress bar over the bytes copied.
    """
    from filelock import FileLock

    from .utils import local_root as local_base

    root = Path(root).resolve()
    manifest = read_manifest(root)
    target = local_base(local_root) / "mamikit-stores" / hashlib.sha1(str(root).encode()).hexdigest()[:12]
    target.mkdir(parents=True, exist_ok=True)
    with FileLock(target / ".copy.lock"):
        local_manifest = read_manifest(target, missing_ok=True)
        if local_manifest is not None and _same_manifest(local_manifest, manifest):
            return target
        (target / MANIFEST).unlink(missing_ok=True)
        record_path = target / COPY_RECORD
        record = read_json(record_path) if record_path.is_file() else {}
        todo = []
        for rel, size, digest in store_files(manifest):
            source = root / rel
            if not source.is_file():
                raise MamikitError(f"{source}: the feature store's manifest records this file but it is missing; "
                                   "re-run the extraction (notebook 02)")
            size = source.stat().st_size if size is None else size
            done = record.get(rel)
            if done and done["bytes"] == size and (target / rel).is_file() and (target / rel).stat().st_size == size \
                    and (digest is None or done["sha256"] == digest):
                continue
            todo.append((rel, size, digest))
        from tqdm.auto import tqdm

        bar = tqdm(total=sum(s for _, s, _ in todo), unit="B", unit_scale=True, leave=False, disable=not progress,
                   desc="local copy of the feature store")
        for rel, size, digest in todo:
            record[rel] = _copy_verified(root / rel, target / rel, size, digest, bar)
            write_json(record_path, record)
        bar.close()
        write_json(target / MANIFEST, manifest)
    return target


def _same_manifest(a: dict, b: dict) -> bool:
    """Whether two manifests describe the same files (the version stamp aside)."""
    strip = ("mamikit_version",)
    return {k: v for k, v in a.items() if k not in strip} == {k: v for k, v in b.items() if k not in strip}


def _copy_verified(source: Path, target: Path, size: int, digest: str | None, bar) -> dict:
    """Copy one file through a temporary name and hash what was written; the bytes read are hashed too only
    when the manifest records no SHA-256 to check against."""
    target.parent.mkdir(parents=True, exist_ok=True)
    read = hashlib.sha256() if digest is None else None
    with open(source, "rb") as src, atomic_write(target) as dst:
        while chunk := src.read(CHUNK):
            if read is not None:
                read.update(chunk)
            dst.write(chunk)
            bar.update(len(chunk))
    got_size, got_digest = target.stat().st_size, file_sha256(target)
    expected = digest or read.hexdigest()
    if got_size != size or got_digest != expected:
        target.unlink(missing_ok=True)
        what = "the manifest's" if digest else "the source's"
        raise MamikitError(f"{source}: its local copy {target} has {got_size} bytes and SHA-256 {got_digest[:12]}..., "
                           f"{what} are {size} bytes and {expected[:12]}...; the store on Drive may be damaged: "
                           "check it with `python -m mamikit check` or re-run the extraction")
    return {"bytes": got_size, "sha256": got_digest}
