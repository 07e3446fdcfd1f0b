"""Feature extraction: the frozen backbones of section 3.1 run once over every split, into the feature store.

Section 4: "we pre-generated and stored each backbone output instead of
re-evaluating the same data across epochs and experiments". `extract` runs the
backbones of :mod:`mamikit.backbones` over every split and writes the store
described in :mod:`mamikit.store` through that module's writer and manifest
functions.

Extraction writes chunks of `chunk_rows` memes to
STORE/<dataset>/<split>/.parts/ (each file written atomically), so a killed run
resumes where it stopped; the chunks are merged into the final file
(temporary file + rename) and removed. A lock file keeps a second extract off
a store that is being written.

Skipping rule: a meme whose image cannot be decoded (`utils.open_image_rgb`:
missing, empty, truncated, not an image, too large) is left out of every
backbone's file of its split, text included, and listed in the manifest and on
the console; so every file of a split holds the same rows. Odd but valid
images (grayscale, CMYK, palette, RGBA, wrong extension, 1 pixel) are
converted to RGB and stored.

A profile with detector none (`no-detr`, `demo-no-detr`) stores no DETR
features; its manifest says ``"detector": "none"`` and training refuses an
experiment that uses DETR on it.

A dataset of one modality (mamikit/tasks.json's ``modalities``, section 6)
gets the backbones of that modality only: a text-only corpus its text states,
no CLIP or DETR arrays, and no image is opened for it; an image-only set no
text. The manifest records per split which modalities it holds
(``"modalities"``), and `store.FeatureStore` reads them back.

Sibling stores: stores of several profiles live side by side under one
features root (`store.store_dir`), and profiles share backbones (vit-l-14
differs from paper in its CLIP only). Before computing a (backbone, dataset,
split) file, extraction looks in the other folders of the store's parent that
hold a manifest.json (no deeper) for one of the same dtype and split seed
whose manifest records that backbone with the spec this profile gives
(model, weights, revision, the text token limit; the init seed, recorded as
``"init_seed"``, where weights are seeded) and a complete, intact file of
that split made from the same memes (``source_ids_sha1``) with the same
unreadable images. That file and its ids are hard-linked (else copied),
checked against the sibling's size, SHA-256 and row count, and recorded as if
computed, with the sibling's list of skipped memes. A backbone all of whose
files come from siblings is not loaded; its dims and preprocessing, which
only the loaded model tells, are taken to follow from model and revision.
When some file of it is computed after all, the loaded model's full spec must
equal the sibling's, else its files are computed here too.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import os
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .backbones import LOADERS, NUM_DETR_QUERIES, detr_object_mask
from .profiles import Profile, get_profile
from .registry import MODALITIES, dataset_modalities, tasks_config
from .store import (BACKBONES, DTYPES, MANIFEST, NO_DETECTOR, discard_unfinished_writes, is_intact, new_manifest,
                    read_ids, read_manifest, read_safetensors, split_folder, write_backbone, write_manifest,
                    write_safetensors)
from .utils import MamikitError, fault_point, file_sha256, get_logger, open_image_rgb
from .weights import clip_revision, is_tiny, provenance, weights_sha256

log = get_logger(__name__)

IMAGE_BACKBONES = ("clip", "detr")  # extracted before text: they find the unreadable images
MODALITY_OF = {"clip": "image", "detr": "image", "text": "text"}  # what each backbone reads
CHUNK_ROWS = 256  # memes per resumable chunk
LOCK_POLL_S = 10.0  # how often a waiting extract says it is waiting


def _ids_sha(ids) -> str:
    return hashlib.sha1("\n".join(ids).encode()).hexdigest()


def _model_key(name) -> str | None:
    """Compare local paths by their last two components: a store copied to another machine stays valid."""
    if name is None:
        return None
    name = str(name)
    return "/".join(Path(name).parts[-2:]) if name.startswith(("/", ".", "~")) else name


def _wanted(profile: Profile, name: str) -> tuple:
    model = {"clip": profile.clip_model, "detr": profile.detr_model, "text": profile.text_model}[name]
    return (model, provenance(profile, name), *((profile.max_text_tokens,) if name == "text" else ()))


def _recorded(spec: dict, name: str) -> tuple:
    return (spec["model"], spec.get("weights"), *((spec.get("max_tokens"),) if name == "text" else ()))


# ---------------------------------------------------------------------------- reuse of a sibling store's files


def _seeded_weights(profile: Profile, name: str) -> bool:
    """Whether the backbone's weights are built from `profile.init_seed` (a tiny model, or weights random)."""
    model = {"clip": profile.clip_model, "detr": profile.detr_model, "text": profile.text_model}[name]
    return profile.weights == "random" or is_tiny(name, model) or (name == "clip" and not profile.clip_pretrained)


def _revision_unloaded(profile: Profile, name: str) -> str | None:
    """The revision the backbone's loader records, found without loading the model (see `backbones.load_*`)."""
    if _seeded_weights(profile, name):
        return None
    if name == "clip":
        return clip_revision(profile.clip_model, profile.clip_pretrained)
    model = profile.detr_model if name == "detr" else profile.text_model
    if os.path.isdir(os.path.expanduser(model)):
        return f"sha256:{weights_sha256(model)}"
    try:  # the hub cache's snapshot folder is named by the commit the loader reports
        from transformers.utils import cached_file

        path = Path(cached_file(model, "config.json", local_files_only=True))
    except Exception:  # not in the cache: the loader would report no revision either, or fail
        return None
    return path.parent.name if path.parent.parent.name == "snapshots" else None


def _identity(spec: dict, name: str) -> tuple:
    """What of a recorded spec can be told from the profile alone: model, weights, revision, text token limit."""
    return (_model_key(spec.get("model")), spec.get("weights"), spec.get("revision"),
            *((spec.get("max_tokens"),) if name == "text" else ()))


def _same_spec(a: dict, b: dict) -> bool:
    """Two recorded specs that give the same numbers: equal fields, local model paths compared as `_model_key`."""
    return {**a, "model": _model_key(a.get("model"))} == {**b, "model": _model_key(b.get("model"))}


def _siblings(store: Path, dtype: str, split_seed: int) -> list[tuple[Path, dict]]:
    """The other stores beside `store` (folders of its parent with a readable manifest) of this dtype and split seed."""
    here = store.resolve()
    found = []
    for folder in sorted(here.parent.iterdir()):
        try:
            if folder.resolve() == here or not (folder / MANIFEST).is_file():
                continue
            m = read_manifest(folder)
        except (MamikitError, OSError) as exc:
            log.info("not reusing features from %s: %s", folder, exc)
            continue
        if m.get("dtype") == dtype and m.get("split_seed") == split_seed:
            found.append((folder, m))
    return found


def _derived_identity(profile: Profile, name: str) -> tuple:
    """`_identity` of the spec the profile's backbone would record, without loading it (dims are not known)."""
    return (_model_key(_wanted(profile, name)[0]), provenance(profile, name), _revision_unloaded(profile, name),
            *((profile.max_text_tokens,) if name == "text" else ()))


def _find_reusable(siblings, want: tuple, recorded: dict | None, profile: Profile, name: str, dataset: str,
                   split: str, entry: dict):
    """A sibling's complete, intact file of this backbone and split with our spec -> (folder, spec, split entry, info).

    The sibling must record the spec this profile derives (`want`, `_derived_identity`), or the very spec
    this store records already (`recorded`), the same init seed where the weights are seeded, the same
    memes (`source_ids_sha1`) and, when this split's unreadable images are known already, the same ones.
    None when no sibling qualifies.
    """
    known = entry.get("skipped")
    for folder, m in siblings:
        spec = m.get("backbones", {}).get(name)
        if not spec or _identity(spec, name) != want or (recorded and not _same_spec(recorded, spec)):
            continue
        if _seeded_weights(profile, name) and m.get("init_seed") != profile.init_seed:
            continue  # a store written before init seeds were recorded is not reused for seeded weights
        theirs = m.get("datasets", {}).get(dataset, {}).get(split)
        if not theirs or theirs.get("source_ids_sha1") != entry["source_ids_sha1"] or theirs.get("skipped") is None:
            continue
        info = theirs.get("backbones", {}).get(name)
        if not info or not info.get("complete") or not is_intact(folder, info):
            continue
        if known is not None and {s["id"] for s in known} != {s["id"] for s in theirs["skipped"]}:
            continue
        return folder, spec, theirs, info
    return None


def _reuse_files(store: Path, sibling: Path, info: dict) -> bool:
    """Hard-link (else copy) a sibling's array and ids files into `store`, verified; False, nothing kept, if not.

    Each file goes to a temporary name (removed by `discard_unfinished_writes` after a kill) and is renamed
    into place once its size and SHA-256 (array file) or row count (ids file) match the sibling's manifest.
    """
    placed = []
    for rel in (info["file"], info["ids_file"]):
        source, target = sibling / rel, store / rel
        tmp = target.parent / f".{target.name}.reuse.tmp"
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp.unlink(missing_ok=True)
        try:
            os.link(source, tmp)
        except OSError:  # another file system, or links not allowed: a copy
            shutil.copyfile(source, tmp)
        if rel == info["file"]:
            ok = tmp.stat().st_size == info.get("bytes") and info.get("sha256") in (None, file_sha256(tmp))
        else:
            ok = len(read_ids(tmp)) == info.get("rows")
        if not ok:
            for stale in (tmp, *(t for t, _ in placed)):
                stale.unlink()
            log.warning("%s: does not match its manifest; extracting %s here instead", source, rel)
            return False
        placed.append((tmp, target))
    for tmp, target in placed:
        if target.exists() and os.path.samefile(tmp, target):
            tmp.unlink()  # already linked by a run killed before its manifest write (rename would do nothing)
        else:
            os.replace(tmp, target)
    return True


def _reuse(store: Path, manifest: dict, siblings, want: tuple, profile: Profile, name: str, dataset: str, split: str,
           entry: dict):
    """Take this job's file from a sibling store if one holds it -> the spec it was made with, or None."""
    t0 = time.time()
    found = _find_reusable(siblings, want, manifest["backbones"].get(name), profile, name, dataset, split, entry)
    if found is None:
        return None
    folder, spec, theirs, info = found
    discard_unfinished_writes(store, dataset, split, name)
    if not _reuse_files(store, folder, info):
        return None
    fault_point("after_reuse")  # files in place, manifest not yet updated
    if entry.get("skipped") is None or name in IMAGE_BACKBONES:
        entry["skipped"] = json.loads(json.dumps(theirs["skipped"]))
    entry["backbones"][name] = {**json.loads(json.dumps(info)), "seconds": round(time.time() - t0, 2)}
    log.info("reused %s %s/%s from %s", name, dataset, split, folder)
    return spec


@contextlib.contextmanager
def _store_lock(store: Path):
    """Hold STORE/.lock; while another extract holds it, say so every LOCK_POLL_S seconds."""
    from filelock import FileLock, Timeout

    lock = FileLock(str(store / ".lock"))
    owner = store / ".lock.owner"
    timeout = 0.0  # the first refusal is reported at once, then every LOCK_POLL_S seconds
    while True:
        try:
            lock.acquire(timeout=timeout)
            break
        except Timeout:
            who = ""
            with contextlib.suppress(OSError, ValueError):
                who = f" (pid {int(owner.read_text().split()[0])})"
            log.info("waiting for %s: another extract%s is writing this store; this one continues when it finishes",
                     store / ".lock", who)
            timeout = LOCK_POLL_S
    # The lock is an OS file lock: it goes away with a killed process, so a crash never leaves the store locked.
    try:
        with contextlib.suppress(OSError):
            owner.write_text(f"{os.getpid()}\n")
        yield
    finally:
        with contextlib.suppress(OSError):
            owner.unlink()
        lock.release()


def _open_manifest(store: Path, profile: Profile, names, dtype: str, split_seed: int) -> dict:
    """The store's manifest, new or checked to hold features made with these settings."""
    try:
        m = read_manifest(store, missing_ok=True)
    except MamikitError as exc:
        raise MamikitError(f"{exc}; choose another --out") from None
    if m is None:
        m = new_manifest(profile.name, dtype, split_seed)
        m["init_seed"] = profile.init_seed  # what seeded weights were built with: a sibling store reuses by it
        if not profile.has_detector:
            m["detector"] = NO_DETECTOR
        return m
    if not profile.has_detector and "detr" in m["backbones"]:
        raise MamikitError(f"{store}: holds DETR features; profile {profile.name} has detector none: "
                           "use another --out or delete the store")
    if profile.has_detector and m.get("detector") == NO_DETECTOR:
        raise MamikitError(f"{store}: extracted with detector none; profile {profile.name} has a DETR: "
                           "use another --out or delete the store")
    for key, value in (("split_seed", split_seed), ("dtype", dtype)):
        if m.get(key) != value:
            raise MamikitError(f"{store}: written with {key} {m.get(key)}, this run asks for {value}; "
                               "use another --out or delete the store")
    for name in names:
        spec = m["backbones"].get(name)
        if spec and tuple(map(_model_key, _recorded(spec, name))) != tuple(map(_model_key, _wanted(profile, name))):
            raise MamikitError(
                f"{store}: {name} features come from {_recorded(spec, name)}, "
                f"this run asks for {_wanted(profile, name)}; "
                "use another --out or delete the store"
            )
    return m


def _complete(store: Path, entry: dict, name: str) -> bool:
    info = entry["backbones"].get(name)
    if not info or not info.get("complete"):
        return False
    if not is_intact(store, info):
        log.warning("%s: missing or damaged; extracting it again", store / info["file"])
        return False
    return True


def _prefetch(pool: ThreadPoolExecutor, fn: Callable, items: list, batch_size: int, depth: int = 2):
    """Yield fn(item) batch by batch while the pool already works on the next `depth` batches."""
    batches = [items[i : i + batch_size] for i in range(0, len(items), batch_size)]
    pending = [[pool.submit(fn, x) for x in b] for b in batches[:depth]]
    for i in range(len(batches)):
        futures = pending.pop(0)
        if i + depth < len(batches):
            pending.append([pool.submit(fn, x) for x in batches[i + depth]])
        yield [f.result() for f in futures]


def _decode(path) -> tuple[object, str | None]:
    """Open one image -> (RGB image, None) or (None, reason it cannot be used)."""
    if not isinstance(path, str) or not path:
        return None, "no image file"
    try:
        return open_image_rgb(path), None
    except MamikitError as exc:
        msg = str(exc)
        return None, msg[len(path) + 2 :] if msg.startswith(f"{path}: ") else msg


def _layout(bb, np_dtype) -> dict[str, tuple]:
    """Array name -> (dtype, shape after the row axis) of one chunk of `bb`."""
    if bb.name == "clip":
        return {"embeds": (np_dtype, (5, bb.dim))}
    if bb.name == "detr":
        return {"embeds": (np_dtype, (NUM_DETR_QUERIES, bb.dim)),
                "logits": (np_dtype, (NUM_DETR_QUERIES, bb.num_logits)),
                "mask": (np.uint8, (NUM_DETR_QUERIES,))}
    return {"input_ids": (np.int32, ()), "hidden": (np_dtype, (bb.dim,)), "lengths": (np.int64, ())}


def _image_chunk(bb, rows, pool, batch_size, np_dtype):
    """Run an image backbone over rows -> ({array: pieces}, stored ids, skipped [{id, image, reason}])."""

    def prepare(item):
        meme_id, path = item
        image, reason = _decode(path)
        if image is None:
            return meme_id, path, None, reason
        try:
            return meme_id, path, bb.prepare(image), None
        except Exception as exc:
            raise MamikitError(f"{path}: {bb.name} preprocessing failed ({type(exc).__name__}: {exc})") from exc

    pieces = {k: [] for k in _layout(bb, np_dtype)}
    stored, skipped = [], []
    for batch in _prefetch(pool, prepare, list(zip(rows["id"], rows["image"])), batch_size):
        skipped += [{"id": m, "image": p, "reason": r} for m, p, x, r in batch if x is None]
        ok = [(m, x) for m, _, x, _ in batch if x is not None]
        if not ok:
            continue
        stored += [m for m, _ in ok]
        xs = [x for _, x in ok]
        if bb.name == "clip":
            pieces["embeds"].append(bb.forward(torch.stack(xs)).cpu().numpy().astype(np_dtype))  # (B, 5, D)
        else:
            embeds, logits = bb.forward(xs)  # (B, 100, D), (B, 100, 92)
            pieces["embeds"].append(embeds.cpu().numpy().astype(np_dtype))
            pieces["logits"].append(logits.cpu().numpy().astype(np_dtype))
            pieces["mask"].append(detr_object_mask(logits).cpu().numpy().astype(np.uint8))  # from float32 logits
    return pieces, stored, skipped


def _text_chunk(bb, rows, skip: set, batch_size, np_dtype):
    """Run the text backbone over rows not in `skip` -> ({array: pieces}, stored ids, [])."""
    rows = rows[~rows["id"].isin(skip)]
    pieces = {"input_ids": [], "hidden": [], "lengths": []}
    texts = rows["text"].tolist()
    for i in range(0, len(texts), batch_size):
        tok = bb.tokenize(texts[i : i + batch_size])
        mask = tok["attention_mask"].bool()  # (B, T)
        hidden = bb.forward(tok["input_ids"], tok["attention_mask"]).cpu()  # (B, T, D)
        pieces["input_ids"].append(tok["input_ids"][mask].numpy().astype(np.int32))  # (t,) row-major = meme order
        pieces["hidden"].append(hidden[mask].numpy().astype(np_dtype))  # (t, D)
        pieces["lengths"].append(mask.sum(1).numpy().astype(np.int64))
    return pieces, rows["id"].tolist(), []


def _scan_images(frame, pool, progress: bool, desc: str) -> list[dict]:
    """Decode every image of a split (text-only extraction) -> the memes to skip."""
    from tqdm.auto import tqdm

    skipped = []
    items = list(zip(frame["id"], frame["image"]))
    results = pool.map(lambda it: _decode(it[1])[1], items)
    for (meme_id, path), reason in tqdm(zip(items, results), total=len(items), desc=desc, unit="meme",
                                        disable=not progress):
        if reason is not None:
            skipped.append({"id": meme_id, "image": path, "reason": reason})
    return skipped


def _extract_split(bb, store: Path, dataset: str, split: str, frame, entry: dict, *, np_dtype, chunk_rows: int,
                   batch_size: int, pool, progress: bool, on_chunk, skip: set | None) -> dict:
    """Fill one (dataset, split, backbone) file through resumable chunks; returns its manifest entry."""
    from tqdm.auto import tqdm

    parts_dir = split_folder(store, dataset, split) / ".parts"
    ids = frame["id"].tolist()
    bounds = [(i, min(i + chunk_rows, len(ids))) for i in range(0, len(ids), chunk_rows)] or [(0, 0)]
    parts = [parts_dir / f"{bb.name}-{k:05d}.safetensors" for k in range(len(bounds))]
    shas = [_ids_sha(ids[a:b]) + f"-{chunk_rows}" for a, b in bounds]
    # Keep the chunks of an interrupted run that cover the same memes; drop anything else.
    done = set()
    for k, part in enumerate(parts):
        with contextlib.suppress(MamikitError):
            if part.exists() and read_safetensors(part, names=())[1].get("chunk") == shas[k]:
                done.add(k)
    discard_unfinished_writes(store, dataset, split, bb.name)  # a merge killed half-way
    if parts_dir.exists():
        for stale in parts_dir.glob(f"*{bb.name}-*"):
            if stale not in parts or parts.index(stale) not in done:
                stale.unlink()
    bar = tqdm(total=len(ids), initial=sum(b - a for k, (a, b) in enumerate(bounds) if k in done),
               desc=f"{bb.name} {dataset}/{split}", unit="meme", disable=not progress)
    start = time.time()
    for k, (a, b) in enumerate(bounds):
        if k in done:
            continue
        rows = frame.iloc[a:b]
        if bb.name == "text":
            pieces, stored, skipped = _text_chunk(bb, rows, skip or set(), batch_size, np_dtype)
        else:
            pieces, stored, skipped = _image_chunk(bb, rows, pool, batch_size, np_dtype)
            for s in skipped:
                if skip is None or s["id"] not in skip:  # report each meme once, not once per backbone
                    bar.write(f"skipped {dataset}/{split} {s['id']} ({s['image']}): {s['reason']}", file=sys.stderr)
        for name, (dt, tail) in _layout(bb, np_dtype).items():
            pieces[name] = pieces[name] or [np.zeros((0, *tail), dt)]
        write_safetensors(parts[k], pieces,
                          {"chunk": shas[k], "ids": json.dumps(stored), "skipped": json.dumps(skipped)})
        bar.update(b - a)
        if on_chunk is not None:
            on_chunk(bb.name, dataset, split, k)
        fault_point("after_chunk")
    bar.close()

    # Merge the chunks into the final file (streamed from the memory-mapped parts).
    chunks = [read_safetensors(p) for p in parts]
    stored = [m for _, meta in chunks for m in json.loads(meta["ids"])]
    skipped = [s for _, meta in chunks for s in json.loads(meta["skipped"])]
    names = [n for n in _layout(bb, np_dtype) if n != "lengths"]
    merged = {n: [arrays[n] for arrays, _ in chunks] for n in names}
    if bb.name == "text":
        lengths = np.concatenate([arrays["lengths"] for arrays, _ in chunks])
        merged["offsets"] = [np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)]
    info = write_backbone(store, dataset, split, bb.name, merged, stored)
    del chunks, merged  # drop the parts' maps before the parts are deleted
    fault_point("after_merge")  # final file written, manifest not yet updated
    return {"file": info["file"], "ids_file": info["ids_file"], "rows": info["rows"], "bytes": info["bytes"],
            "sha256": info["sha256"], "skipped": skipped, "complete": True, "seconds": round(time.time() - start, 2),
            "arrays": info["arrays"]}


def _remove_parts(split_dir: Path, name: str) -> None:
    """Delete one backbone's chunks of a split, and the chunk folder once it is empty."""
    parts_dir = split_dir / ".parts"
    for part in parts_dir.glob(f"*{name}-*") if parts_dir.exists() else []:
        part.unlink()
    with contextlib.suppress(OSError):
        parts_dir.rmdir()  # only when empty


def _as_profile(profile) -> Profile:
    return profile if isinstance(profile, Profile) else get_profile(str(profile))


def held_modalities(dataset: str) -> tuple[str, ...]:
    """What a dataset's memes hold: tasks.json's modalities, both for a dataset the tasks file does not list."""
    return dataset_modalities(dataset) if dataset in tasks_config()["datasets"] else MODALITIES


def _parse_backbones(backbones) -> list[str]:
    names = [b.strip() for b in backbones.split(",")] if isinstance(backbones, str) else list(backbones)
    unknown = [n for n in names if n not in BACKBONES]
    if unknown or not names:
        raise MamikitError(f"unknown backbone(s) {', '.join(unknown) or '(none)'}; choose from {', '.join(BACKBONES)}")
    return [n for n in BACKBONES if n in names]


def extract_frames(frames: dict, store_root, profile, backbones=BACKBONES, batch_size: int = 16, device="auto",
                   dtype: str = "float16", split_seed: int = 0, progress: bool = True, *, chunk_rows: int = CHUNK_ROWS,
                   workers: int = 4, on_chunk: Callable | None = None, modalities: dict | None = None,
                   reuse: bool = True) -> dict:
    """Fill a feature store from split tables already loaded (see `extract` for the arguments).

    Args:
        frames: {dataset: {split: DataFrame with columns id, image, text}}.
        modalities: {dataset: ("text",), ...}; a dataset left out holds what mamikit/tasks.json says
            (:func:`held_modalities`). Only the backbones of its modalities run on it.
        chunk_rows: memes per resumable chunk.
        workers: threads that decode and preprocess images while the model runs.
        on_chunk: called as on_chunk(backbone, dataset, split, chunk_index) after each chunk is on disk.
        reuse: take a (backbone, dataset, split) file a sibling store already holds with the same spec
            (module docstring, "Sibling stores") instead of computing it.
    Returns:
        Summary: {"store", "written", "already_complete", "reused", "skipped" {dataset/split: [ids]},
        "seconds"}; "reused" lists the dataset/split/backbone files taken from a sibling store.
    """
    t0 = time.time()
    profile = _as_profile(profile)
    names = _parse_backbones(backbones)
    if not profile.has_detector and "detr" in names:
        names.remove("detr")  # detector none: the store holds CLIP and text only, and its manifest says so
        if not names:
            raise MamikitError(f"profile {profile.name} has detector none: there are no DETR features to extract")
    if dtype not in DTYPES:
        raise MamikitError(f"unknown dtype {dtype!r}; choose float16 or float32")
    if batch_size < 1 or chunk_rows < 1:
        raise MamikitError("batch size and chunk size must be positive")
    store = Path(store_root)
    store.mkdir(parents=True, exist_ok=True)
    summary = {"store": str(store), "written": [], "already_complete": [], "reused": [], "skipped": {}}
    with _store_lock(store):
        discard_unfinished_writes(store)  # a manifest write killed before its rename
        manifest = _open_manifest(store, profile, names, dtype, split_seed)
        jobs = []
        for dataset, splits in frames.items():
            held = tuple((modalities or {}).get(dataset) or held_modalities(dataset))
            for split, frame in splits.items():
                frame = (frame.assign(id=frame["id"].astype(str)).sort_values("id", kind="stable")
                         .reset_index(drop=True))
                dup = frame["id"][frame["id"].duplicated()]
                if len(dup):
                    raise MamikitError(f"{dataset}/{split}: duplicate meme id(s) {', '.join(dup.unique()[:5])}")
                sha = _ids_sha(frame["id"])
                entry = manifest["datasets"].setdefault(dataset, {}).get(split)
                if entry is None or entry.get("source_ids_sha1") != sha:  # new or changed split: start it over
                    entry = {"source_rows": len(frame), "source_ids_sha1": sha, "skipped": None, "backbones": {}}
                    manifest["datasets"][dataset][split] = entry
                entry["modalities"] = [m for m in MODALITIES if m in held]
                if "image" not in held and entry.get("skipped") is None:
                    entry["skipped"] = []  # no image to read, none to skip
                for name in (n for n in names if MODALITY_OF[n] in held):
                    key = f"{dataset}/{split}/{name}"
                    if _complete(store, entry, name):
                        summary["already_complete"].append(key)
                        _remove_parts(split_folder(store, dataset, split), name)
                    else:
                        entry["backbones"].pop(name, None)
                        jobs.append((name, dataset, split, frame, entry))
        manifest["complete"] = not jobs and manifest.get("complete", False)
        write_manifest(store, manifest)
        np_dtype = DTYPES[dtype]
        siblings = _siblings(store, dtype, split_seed) if reuse and jobs else []
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool, torch.inference_mode():
            for name in names:
                mine = [j for j in jobs if j[0] == name]
                if not mine:
                    continue
                reused, todo = {}, []
                want = _derived_identity(profile, name) if siblings else None
                for job in mine:
                    _, dataset, split, _, entry = job
                    spec = (_reuse(store, manifest, siblings, want, profile, name, dataset, split, entry)
                            if siblings else None)
                    if spec is None:
                        todo.append(job)
                        continue
                    reused[job[1:3]] = spec
                    manifest["backbones"][name] = spec
                    write_manifest(store, manifest)
                    _remove_parts(split_folder(store, dataset, split), name)
                    summary["reused"].append(f"{dataset}/{split}/{name}")
                if not todo:
                    continue  # every file of this backbone came from a sibling: the model is not loaded
                bb = LOADERS[name](profile, device)  # loaded only when something is left to compute
                manifest["backbones"][name] = bb.spec()
                if any(not _same_spec(spec, bb.spec()) for spec in reused.values()):
                    log.warning("%s: the %s features taken from a sibling store were made with another spec than "
                                "this model's (%s); extracting them here instead", store, name, bb.spec())
                    todo = mine
                    for key in reused:
                        summary["reused"].remove(f"{key[0]}/{key[1]}/{name}")
                for _, dataset, split, frame, entry in todo:
                    known = entry.get("skipped")
                    if name == "text" and known is None:
                        known = _scan_images(frame, pool, progress, f"images {dataset}/{split}")
                        for s in known:
                            log.warning("skipped %s/%s %s (%s): %s", dataset, split, s["id"], s["image"], s["reason"])
                        entry["skipped"] = known
                    skip = None if known is None else {s["id"] for s in known}
                    info = _extract_split(bb, store, dataset, split, frame, entry, np_dtype=np_dtype,
                                          chunk_rows=chunk_rows, batch_size=batch_size, pool=pool,
                                          progress=progress, on_chunk=on_chunk, skip=skip)
                    if name in IMAGE_BACKBONES:
                        found = {s["id"] for s in info["skipped"]}
                        if skip is not None and found != skip:
                            log.warning("%s/%s: %s could not read %s unlike an earlier backbone (images changed?); "
                                        "re-extract this split into a fresh store", dataset, split, name,
                                        sorted(found ^ skip)[:5])
                        entry["skipped"] = info["skipped"]
                    info["skipped"] = len(info["skipped"])
                    entry["backbones"][name] = info
                    write_manifest(store, manifest)
                    _remove_parts(split_folder(store, dataset, split), name)
                    summary["written"].append(f"{dataset}/{split}/{name}")
                del bb
                gc.collect()  # free the backbone (GPU memory) before the next one loads
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
        manifest["complete"] = True
        write_manifest(store, manifest)
    for dataset, splits in manifest["datasets"].items():
        for split, entry in splits.items():
            if entry.get("skipped"):
                summary["skipped"][f"{dataset}/{split}"] = [s["id"] for s in entry["skipped"]]
    summary["seconds"] = round(time.time() - t0, 2)
    return summary


def extract(data_root, store_root, profile, backbones=BACKBONES, batch_size: int = 16, device="auto",
            dtype: str = "float16", split_seed: int = 0, progress: bool = True, **kwargs) -> dict:
    """Run the frozen backbones over every split of a data folder into a resumable feature store.

    A re-run continues an interrupted one and recomputes nothing already
    stored; on a complete store it only checks the ids and loads no backbone.

    Args:
        data_root: data folder read by `data.load_datasets` (MAMI/, FBHM/).
        store_root: the feature store folder.
        profile: a Profile or a profile name ("demo", "paper").
        backbones: subset of ("clip", "detr", "text"), or a comma-separated string.
        batch_size: memes per forward pass.
        device: "auto", "cpu" or "cuda".
        dtype: "float16" (default) or "float32" for the stored features.
        split_seed: seed of the 80/20 train/dev split (recorded; a store holds one).
        progress: show a progress bar per backbone and split.
        **kwargs: `datasets` for `load_datasets`; chunk_rows, workers, on_chunk, reuse for `extract_frames`.
    Returns:
        Summary dict (see `extract_frames`).
    """
    from .data import load_datasets

    loaded = load_datasets(data_root, datasets=kwargs.pop("datasets", None), split_seed=split_seed)
    problems = sum(len(d.problems) for d in loaded.values())
    if problems:
        log.warning("%d data row(s) could not be used; `python -m mamikit check --data %s` lists them",
                    problems, data_root)
    frames = {name: d.splits for name, d in loaded.items()}
    return extract_frames(frames, store_root, profile, backbones, batch_size, device, dtype, split_seed, progress,
                          **kwargs)
