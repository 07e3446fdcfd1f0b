"""Unpack the MAMI and FBHM archives users hold into the layouts of :mod:`mamikit.data` (paper section 4).

The paper's data come as downloads: MAMI as password-protected zips (the
training set, the test set and, later, ``test_labels.txt``), Facebook's
hateful memes (FBHM) as one zip. Their top folders vary between releases and
re-packings (``TRAINING/``, ``MAMI DATASET/TRAINING/``, an outer zip holding
``training.zip`` and ``test.zip``, ``data/`` for FBHM), so files are found by
name wherever they sit:

=========================  ==========================================
found in an archive        written to (below ``data_root``)
=========================  ==========================================
folder of ``training.csv``  ``MAMI/TRAINING/`` (the csv and its images)
folder of ``Test.csv``      ``MAMI/test/``
``test_labels.txt``         ``MAMI/test_labels.txt``
folder of ``train.jsonl``   ``FBHM/*.jsonl`` and ``FBHM/img/``
=========================  ==========================================

Decisions:

- An archive is a zip, a folder (for archives unpacked by hand, e.g. AES
  zips that Python cannot decrypt), or, for MAMI, a plain ``.txt`` file taken
  as ``test_labels.txt``. Zips inside an archive are opened one level deep.
- The password is handed to :mod:`zipfile` only (ZipCrypto); it is never
  written, logged or returned. A callable (e.g. :func:`ask_password`) is
  called only when an encrypted member is met.
- Every part is checked before anything is written: the images its csv /
  jsonl names must be in the archive (else "incomplete", listing them).
- Parts are extracted into ``data_root/.<dataset>.partial/`` and renamed into
  place at the end, so an interrupted run leaves the old state; a part already
  complete on disk is skipped unless ``overwrite=True``.
- Member names that escape the target (absolute, ``..``) refuse the whole
  archive; ``__MACOSX/``, ``._*`` and ``.DS_Store`` entries are ignored.

Longer than mamikit's usual module (about 550 lines): the two archive layouts, password
handling and the part-by-part plan of what goes where are one procedure; split, each half
would need the other's plan.
"""

from __future__ import annotations

import contextlib
import csv
import getpass
import json
import lzma
import os
import shutil
import tempfile
import time
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from .utils import MamikitError, get_logger, inside

log = get_logger(__name__)

AES = 99  # compression type WinZip / 7-Zip write for AES-encrypted members
SUPPORTED = {zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA}
JUNK_NAMES = {".ds_store", "thumbs.db", "desktop.ini"}
SHOW = 5  # names shown in a message listing missing files or top-level entries
UNPACK_ADVICE = ("unpack it with 7-Zip (`7z x FILE -oFOLDER`, on Colab `!apt-get install p7zip-full` first) "
                 "or `unzip`, and pass the unpacked folder instead")
# Read errors of a zip member: a wrong password shows up as any of them (ZipCrypto checks one byte only).
READ_ERRORS = (RuntimeError, zlib.error, zipfile.BadZipFile, EOFError, lzma.LZMAError)


@dataclass(frozen=True)
class _Part:
    """One piece of a dataset: where it is found in an archive and where it goes."""

    key: str  # name in the summary and the messages
    marker: str  # lower-case file name that locates the part in an archive
    dest: str  # path below <root>/<dataset>/; "" = the dataset folder itself
    kind: str  # "folder": all beside the marker; "file": the marker alone; "jsonl": *.jsonl + img/
    lists: str | None  # how its files name the images: "csv", "jsonl" or None


MAMI_PARTS = (
    _Part("TRAINING", "training.csv", "TRAINING", "folder", "csv"),
    _Part("test", "test.csv", "test", "folder", "csv"),
    _Part("test_labels.txt", "test_labels.txt", "test_labels.txt", "file", None),
)
FBHM_PARTS = (_Part("FBHM", "train.jsonl", "", "jsonl", "jsonl"),)


# ----------------------------------------------------------------------------- password


def ask_password(prompt: str = "MAMI zip password: ") -> str:
    """Ask for the archive password without echoing it (getpass); nothing is stored."""
    value = getpass.getpass(prompt)
    if not value:
        raise MamikitError("no password entered")
    return value


class _Secret:
    """The password for one unpack call, resolved on first use; never printed."""

    __slots__ = ("_value",)

    def __init__(self, password):
        if password is not None and not callable(password) and not isinstance(password, (str, bytes)):
            raise MamikitError("password must be str, bytes or a callable returning one, "
                               f"not {type(password).__name__}")
        self._value = password

    def get(self, label: str) -> bytes:
        if self._value is None:
            raise MamikitError(f"{label} is password-protected: pass password=... "
                               "(in the notebook password=ask_password())")
        if callable(self._value):
            value = self._value()
            if not isinstance(value, (str, bytes)) or not value:
                raise MamikitError(f"{label} is password-protected and no password was given")
            self._value = value
        return self._value.encode("utf-8") if isinstance(self._value, str) else self._value

    def __repr__(self) -> str:
        return "<password hidden>"


# ----------------------------------------------------------------------------- sources


def _is_junk(name: str) -> bool:
    parts = name.split("/")
    base = parts[-1]
    return "__MACOSX" in parts or base.startswith("._") or base.lower() in JUNK_NAMES


class _ZipSource:
    """A zip archive: member names (files only, junk dropped) and their reading."""

    def __init__(self, zf: zipfile.ZipFile, label: str, root: Path):
        self.label, self.zf, self.infos = label, zf, {}
        for info in zf.infolist():
            name = info.filename.replace("\\", "/")
            if info.is_dir() or name.endswith("/") or _is_junk(name) or name in self.infos:
                continue
            try:
                inside(root, name)
            except MamikitError:
                raise MamikitError(f"{label}: member {name!r} would be written outside the data folder; "
                                   "refusing to unpack this archive") from None
            if info.compress_type == AES:
                raise MamikitError(f"{label} is encrypted with AES, which Python's zipfile cannot read: "
                                   f"{UNPACK_ADVICE}")
            if info.compress_type not in SUPPORTED:
                raise MamikitError(f"{label}: member {name!r} uses compression method {info.compress_type} "
                                   "(e.g. Deflate64 from Windows Explorer), which Python's zipfile cannot read: "
                                   f"{UNPACK_ADVICE}")
            self.infos[name] = info
        self.names = sorted(self.infos)

    def size(self, name: str) -> int:
        return self.infos[name].file_size

    def encrypted(self, name: str) -> bool:
        return bool(self.infos[name].flag_bits & 0x1)

    @contextlib.contextmanager
    def open(self, name: str, secret: _Secret):
        """Yield a binary file object of one member; read errors become a MamikitError."""
        info = self.infos[name]
        pwd = secret.get(self.label) if self.encrypted(name) else None
        try:
            with self.zf.open(info, pwd=pwd) as fh:
                yield fh
        except READ_ERRORS as exc:
            if self.encrypted(name):
                raise MamikitError(f"wrong password for {self.label} (could not decrypt {name}; "
                                   "or the archive is damaged)") from None
            raise MamikitError(f"{self.label}: member {name} is damaged ({exc}); download the archive again") from None


class _DirSource:
    """A folder unpacked by hand, read like an archive."""

    def __init__(self, path: Path, label: str):
        self.label, self.path = label, path
        self.names = sorted(p.relative_to(path).as_posix() for p in path.rglob("*")
                            if p.is_file() and not _is_junk(p.relative_to(path).as_posix()))

    def size(self, name: str) -> int:
        return (self.path / name).stat().st_size

    def encrypted(self, name: str) -> bool:
        return False

    @contextlib.contextmanager
    def open(self, name: str, secret: _Secret):
        with open(self.path / name, "rb") as fh:
            yield fh


class _FileSource(_DirSource):
    """A single plain file presented under a fixed member name (test_labels.txt)."""

    def __init__(self, path: Path, name: str):
        self.label, self.path, self.names, self._file = str(path), path.parent, [name], path

    def size(self, name: str) -> int:
        return self._file.stat().st_size

    @contextlib.contextmanager
    def open(self, name: str, secret: _Secret):
        with open(self._file, "rb") as fh:
            yield fh


def _missing_archive(path: Path, dataset: str) -> MamikitError:
    where = path.parent
    hint = f"the folder {where} does not exist (is Google Drive mounted?)"
    if where.is_dir():
        zips = sorted(p.name for p in where.iterdir() if p.suffix.lower() == ".zip")[:SHOW]
        hint = f"zips in {where}: {', '.join(zips)}" if zips else f"{where} holds no zip"
    return MamikitError(f"{dataset} archive not found: {path} -- expected the zip you downloaded "
                        f"(e.g. copied to your Drive); {hint}")


def _open_zip(path: Path, label: str, root: Path, stack: contextlib.ExitStack) -> _ZipSource:
    try:
        zf = stack.enter_context(zipfile.ZipFile(path))
    except zipfile.BadZipFile:
        raise MamikitError(f"{label} is not a zip archive, or it is damaged or only partly downloaded; "
                           "download it again") from None
    return _ZipSource(zf, label, root)


def _open_sources(paths: list[Path], dataset: str, root: Path, secret: _Secret, stack: contextlib.ExitStack):
    """Open each archive (and the zips inside it, one level deep) -> [(top-level path, [sources])]."""
    out = []
    for path in paths:
        if path.is_dir():
            top = _DirSource(path, str(path))
        elif not path.exists():
            raise _missing_archive(path, dataset)
        elif path.stat().st_size == 0:
            raise MamikitError(f"{path} is empty (a download or a Drive sync that did not finish?)")
        elif not zipfile.is_zipfile(path) and path.suffix.lower() == ".txt" and dataset == "MAMI":
            out.append((path, [_FileSource(path, "test_labels.txt")]))
            continue
        else:
            top = _open_zip(path, str(path), root, stack)
        group = [top]
        for name in [n for n in top.names if n.lower().endswith(".zip")]:
            label = f"{path} (inner {name})"
            if isinstance(top, _DirSource):
                group.append(_open_zip(top.path / name, label, root, stack))
                continue
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="mamikit-unpack-")))
            with top.open(name, secret) as src, open(tmp / "inner.zip", "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
            group.append(_open_zip(tmp / "inner.zip", label, root, stack))
        out.append((path, group))
    return out


# ----------------------------------------------------------------------------- parts


def _listed_images(part: _Part, read, rels: list[str]) -> tuple[int, list[str]]:
    """(rows, image names) that the part's csv / jsonl files list; `read(rel)` gives bytes."""
    names: list[str] = []
    rows = 0
    if part.lists == "csv":
        lines = [ln.rstrip("\r")
                 for ln in read(_marker_rel(part, rels)).decode("utf-8-sig", errors="replace").split("\n")]
        lines = [ln for ln in lines if ln.strip()]
        if not lines:
            return 0, []
        sep = "\t" if "\t" in lines[0] else ","
        header = ["".join(ch for ch in c.lower() if ch.isalnum()) for c in _cells(lines[0], sep)]
        col = header.index("filename") if "filename" in header else 0
        for line in lines[1:]:
            cells = _cells(line, sep)
            rows += 1
            if col < len(cells) and cells[col].strip().strip('"'):
                names.append(cells[col].strip().strip('"'))
    elif part.lists == "jsonl":
        for rel in rels:
            if "/" in rel or not rel.lower().endswith(".jsonl"):
                continue
            for line in read(rel).decode("utf-8-sig", errors="replace").split("\n"):
                if not line.strip():
                    continue
                rows += 1
                with contextlib.suppress(ValueError, AttributeError):
                    img = json.loads(line).get("img")
                    if isinstance(img, str) and img:
                        names.append(img)
    return rows, list(dict.fromkeys(names))


def _cells(line: str, sep: str) -> list[str]:
    return line.split("\t") if sep == "\t" else next(csv.reader([line]), [])


def _marker_rel(part: _Part, rels: list[str]) -> str:
    """The marker's path among the part's relative names (shallowest match)."""
    return min((r for r in rels if r.split("/")[-1].lower() == part.marker), key=lambda r: (r.count("/"), r))


def _on_disk(part: _Part, ds_dir: Path) -> tuple[bool, int, int]:
    """(complete, rows, images) of a part already in place below `ds_dir`."""
    target = ds_dir / part.dest if part.dest else ds_dir
    if part.kind == "file":
        return target.is_file() and target.stat().st_size > 0, 0, 0
    if not target.is_dir():
        return False, 0, 0
    rels = [p.name for p in target.iterdir() if p.is_file()]
    if not any(r.lower() == part.marker for r in rels):
        return False, 0, 0
    rows, listed = _listed_images(part, lambda rel: (target / rel).read_bytes(), rels)
    present: dict[str, set[str]] = {}
    for name in listed:
        parent = str(PurePosixPath(name).parent)
        if parent not in present:
            folder = target / parent
            present[parent] = set(os.listdir(folder)) if folder.is_dir() else set()
    found = sum(PurePosixPath(n).name in present[str(PurePosixPath(n).parent)] for n in listed)
    return found == len(listed), rows, found


def _locate(parts, groups) -> dict[str, tuple]:
    """part key -> (source, prefix of the marker's folder, marker name); first archive wins."""
    located: dict[str, tuple] = {}
    for path, group in groups:
        hits = 0
        for src in group:
            for part in parts:
                cands = [n for n in src.names if n.split("/")[-1].lower() == part.marker]
                if not cands:
                    continue
                hits += 1
                name = min(cands, key=lambda n: (n.count("/"), n))
                if part.key in located:
                    log.warning("%s: %s also found in %s; using the one in %s", part.key, name, src.label,
                                located[part.key][0].label)
                    continue
                prefix = name[: len(name) - len(name.split("/")[-1])]
                located[part.key] = (src, prefix, name)
        if not hits:
            wanted = " or ".join(p.marker if p.marker != "test.csv" else "Test.csv" for p in parts)
            tops = sorted({n.split("/")[0] + ("/" if "/" in n else "") for src in group for n in src.names})
            shown = (", ".join(tops[:SHOW]) + (f", ... ({len(tops)} in all)" if len(tops) > SHOW else "")
                     if tops else "nothing")
            raise MamikitError(f"{path}: no {wanted} found in it; it seems to contain: {shown}")
    return located


def _members(part: _Part, src, prefix: str, marker: str, located: dict) -> list[tuple[str, str]]:
    """(member name, path relative to the part) of every file that belongs to the part."""
    if part.kind == "file":
        return [(marker, "")]
    # a member belongs to the part whose marker folder is its deepest enclosing one
    others = [(p, m) for s, p, m in located.values() if s is src and m != marker]
    out = []
    for name in src.names:
        if not name.startswith(prefix) or name.lower().endswith(".zip") or any(name == m for _, m in others):
            continue
        if any(len(p) > len(prefix) and name.startswith(p) for p, _ in others):
            continue
        rel = name[len(prefix):]
        if part.kind == "jsonl" and not (("/" not in rel and rel.lower().endswith(".jsonl"))
                                         or rel.startswith("img/")):
            continue
        out.append((name, rel))
    return out


# ----------------------------------------------------------------------------- unpacking


def _copy(src, name: str, dest: Path, secret: _Secret) -> None:
    """Stream one member to `dest` (zipfile checks its CRC at the end)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    with src.open(name, secret) as fh, open(dest, "wb") as out:
        shutil.copyfileobj(fh, out, 1 << 20)


def _read(src, name: str, secret: _Secret) -> bytes:
    with src.open(name, secret) as fh:
        return fh.read()


def _recover(old: Path, ds_dir: Path) -> None:
    """Put back what a run killed inside :func:`_install` had moved aside, then drop the rest."""
    if not old.is_dir():
        return
    ds_dir.mkdir(parents=True, exist_ok=True)
    for entry in old.iterdir():
        if not (ds_dir / entry.name).exists():
            os.replace(entry, ds_dir / entry.name)
    shutil.rmtree(old)


def _install(partial: Path, ds_dir: Path, old: Path) -> None:
    """Move each top-level entry of `partial` over its namesake in `ds_dir`."""
    ds_dir.mkdir(parents=True, exist_ok=True)
    for entry in sorted(partial.iterdir()):
        dest = ds_dir / entry.name
        if dest.exists():
            old.mkdir(exist_ok=True)
            os.replace(dest, old / entry.name)
            try:
                os.replace(entry, dest)
            except BaseException:
                os.replace(old / entry.name, dest)
                raise
        else:
            os.replace(entry, dest)
    if old.exists():
        shutil.rmtree(old)


def _unpack(dataset: str, parts, archives, data_root, password, progress: bool, overwrite: bool,
            allow_incomplete: bool) -> dict:
    from tqdm.auto import tqdm

    from .synthetic import MARKER

    start = time.perf_counter()
    root = Path(data_root).expanduser()
    paths = [Path(a).expanduser()
             for a in ([archives] if isinstance(archives, (str, os.PathLike)) else list(archives))]
    if not paths:
        raise MamikitError(f"no {dataset} archive given")
    if (root / MARKER).exists():
        raise MamikitError(f"{root} holds a synthetic demo set ({MARKER}); unpack the real data into another folder")
    ds_dir = root / dataset
    _recover(root / f".{dataset}.old", ds_dir)
    summary = {"dataset": dataset, "root": str(ds_dir), "parts": {}, "written": [], "skipped": [], "not_found": [],
               "files": 0, "bytes": 0}
    done = {}
    for part in parts:
        complete, rows, images = _on_disk(part, ds_dir)
        if complete and not overwrite:
            done[part.key] = {"status": "skipped", "path": str(ds_dir / part.dest), "rows": rows, "images": images}
    if len(done) == len(parts):
        summary.update(parts=done, skipped=list(done), seconds=round(time.perf_counter() - start, 2))
        log.info("%s: already complete in %s; nothing unpacked (overwrite=True to redo)", dataset, ds_dir)
        return summary

    root.mkdir(parents=True, exist_ok=True)
    secret = _Secret(password)
    partial, old = root / f".{dataset}.partial", root / f".{dataset}.old"
    with contextlib.ExitStack() as stack:
        located = _locate(parts, _open_sources(paths, dataset, root, secret, stack))
        plan: list[tuple] = []  # (source, member, destination below partial)
        for part in parts:
            if part.key in done:
                summary["parts"][part.key] = done[part.key]
                continue
            if part.key not in located:
                summary["parts"][part.key] = {"status": "not found", "path": str(ds_dir / part.dest)}
                log.warning("%s: no %s in %s; %s not written", dataset, part.marker, ", ".join(map(str, paths)),
                            part.key)
                continue
            src, prefix, marker = located[part.key]
            members = _members(part, src, prefix, marker, located)
            rels = [rel for _, rel in members]
            by_rel = dict((rel, name) for name, rel in members)
            rows, listed = (_listed_images(part, lambda rel: _read(src, by_rel[rel], secret), rels) if part.lists
                            else (0, []))
            present = set(rels)
            missing = [n for n in listed if n not in present]
            info = {"status": "written", "path": str(ds_dir / part.dest), "source": f"{src.label}: {marker}",
                    "rows": rows, "images": len(listed) - len(missing), "files": len(members)}
            if missing:
                msg = (f"{src.label} is incomplete: {len(missing)} of the {len(listed)} images {marker} lists "
                       f"are not in it (first: {', '.join(missing[:SHOW])})")
                if not allow_incomplete:
                    raise MamikitError(msg + "; download the archive again, or pass allow_incomplete=True "
                                             "to unpack what is there")
                log.warning("%s", msg)
                info["missing"] = missing
            summary["parts"][part.key] = info
            plan += [(src, name, f"{part.dest}/{rel}".strip("/") if part.dest else rel) for name, rel in members]

        need = sum(src.size(name) for src, name, _ in plan)
        free = shutil.disk_usage(root).free
        if need > free:
            raise MamikitError(f"unpacking {dataset} needs {need / 1e9:.1f} GB but {root} has "
                               f"{free / 1e9:.1f} GB free")
        if partial.exists():
            shutil.rmtree(partial)  # left by a run that was killed
        partial.mkdir()
        try:
            for src, name, dest in tqdm(plan, desc=f"unpacking {dataset}", unit="file", disable=not progress):
                _copy(src, name, inside(partial, dest), secret)
            _install(partial, ds_dir, old)
        finally:
            shutil.rmtree(partial, ignore_errors=True)
    summary["written"] = [k for k, v in summary["parts"].items() if v["status"] == "written"]
    summary["skipped"] = [k for k, v in summary["parts"].items() if v["status"] == "skipped"]
    summary["not_found"] = [k for k, v in summary["parts"].items() if v["status"] == "not found"]
    summary["files"], summary["bytes"] = len(plan), need
    summary["seconds"] = round(time.perf_counter() - start, 2)
    log.info("%s: wrote %s (%d files) to %s", dataset, ", ".join(summary["written"]) or "nothing", len(plan), ds_dir)
    return summary


def unpack_mami(archives, data_root, password=None, progress: bool = True, *, overwrite: bool = False,
                allow_incomplete: bool = False) -> dict:
    """Unpack the MAMI zips (training, test, test labels) into ``<data_root>/MAMI/``.

    Args:
        archives: one path or a list: zips (any top folders, zips inside them one
            level deep), folders unpacked by hand, or a plain test_labels ``.txt``.
        data_root: the data folder; MAMI/TRAINING/, MAMI/test/ and MAMI/test_labels.txt are written there.
        password: str or bytes for ZipCrypto zips, or a callable returning one
            (e.g. :func:`ask_password`), called only if an encrypted member is met.
            Used for reading only: never written, logged or returned.
        progress: show a progress bar over the files written.
        overwrite: unpack parts already complete on disk again.
        allow_incomplete: unpack a part whose csv lists images missing from the archive
            (they are listed under "missing") instead of stopping.
    Returns:
        {"dataset", "root", "parts": {part: {"status": "written"|"skipped"|"not found", "path",
        "rows", "images", "files", "source"}}, "written", "skipped", "not_found", "files", "bytes", "seconds"}.
    """
    return _unpack("MAMI", MAMI_PARTS, archives, data_root, password, progress, overwrite, allow_incomplete)


def unpack_fbhm(archives, data_root, progress: bool = True, *, password=None, overwrite: bool = False,
                allow_incomplete: bool = False) -> dict:
    """Unpack the Facebook hateful memes zip into ``<data_root>/FBHM/`` (*.jsonl and img/).

    Args:
        archives: one path or a list of zips (any top folder, e.g. ``data/``) or unpacked folders.
        data_root: the data folder; FBHM/ is written there.
        progress: show a progress bar over the files written.
        password: as for :func:`unpack_mami`, for the password-protected original download.
        overwrite: unpack again even when FBHM/ is already complete.
        allow_incomplete: unpack even when the jsonl files name images missing from the archive.
    Returns:
        the summary of :func:`unpack_mami` with the single part "FBHM".
    """
    return _unpack("FBHM", FBHM_PARTS, archives, data_root, password, progress, overwrite, allow_incomplete)
