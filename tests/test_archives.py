"""Tests of mamikit.archives: unpacking MAMI / FBHM zips into the data layouts."""

import io
import logging
import os
import shutil
import struct
import subprocess
import zipfile
import zlib
from pathlib import Path

import pytest

from mamikit import archives
from mamikit.archives import ask_password, unpack_fbhm, unpack_mami
from mamikit.data import load_datasets
from mamikit.utils import MamikitError

PASSWORD = "s3cret-Pw!"


# ----------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    """A small synthetic set in the official layouts (the source of every archive here)."""
    from mamikit.synthetic import generate

    root = tmp_path_factory.mktemp("synth")
    generate(root, seed=2, n_mami=30, n_mami_test=12, n_fbhm=18, progress=False)
    return root


def _files(folder: Path, prefix: str) -> dict[str, bytes]:
    """Every file below `folder` as {prefix + relative name: bytes}."""
    return {prefix + p.relative_to(folder).as_posix(): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _zip(path: Path, files: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            zf.writestr(zipfile.ZipInfo(name), data)
    return path


def _crc_table() -> list[int]:
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ 0xEDB88320 if c & 1 else c >> 1
        table.append(c)
    return table


_TABLE = _crc_table()


class _ZipCrypto:
    """PKWARE traditional encryption (what `zip -P` writes), for building test archives."""

    def __init__(self, password: bytes):
        self.keys = [0x12345678, 0x23456789, 0x34567890]
        for b in password:
            self._update(b)

    def _update(self, b: int) -> None:
        k0 = _TABLE[(self.keys[0] ^ b) & 0xFF] ^ (self.keys[0] >> 8)
        k1 = ((self.keys[1] + (k0 & 0xFF)) * 134775813 + 1) & 0xFFFFFFFF
        k2 = _TABLE[(self.keys[2] ^ (k1 >> 24)) & 0xFF] ^ (self.keys[2] >> 8)
        self.keys = [k0, k1, k2]

    def encrypt(self, data: bytes) -> bytes:
        out = bytearray()
        for b in data:
            t = (self.keys[2] | 2) & 0xFFFF
            out.append(b ^ (((t * (t ^ 1)) >> 8) & 0xFF))
            self._update(b)
        return bytes(out)


def _raw_zip(path: Path, files: dict[str, bytes], password: bytes | None = None, method: int = 8) -> Path:
    """Write a zip by hand: deflated (8) and optionally ZipCrypto-encrypted, or any method number as stored bytes."""
    body, central = bytearray(), bytearray()
    for i, (name, data) in enumerate(files.items()):
        crc = zlib.crc32(data)
        if method == 8:
            comp = zlib.compressobj(6, zlib.DEFLATED, -15)
            payload = comp.compress(data) + comp.flush()
        else:
            payload = data
        flags = 0
        if password is not None:
            flags = 1
            header = bytes((i * 7 + k) & 0xFF for k in range(11)) + bytes([crc >> 24])
            payload = _ZipCrypto(password).encrypt(header + payload)
        raw = name.encode()
        offset = len(body)
        body += struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, flags, method, 0, 0x21, crc, len(payload), len(data),
                            len(raw), 0) + raw + payload
        central += struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, flags, method, 0, 0x21, crc, len(payload),
                               len(data), len(raw), 0, 0, 0, 0, 0, offset) + raw
    end = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, len(files), len(files), len(central), len(body), 0)
    path.write_bytes(bytes(body + central + end))
    return path


def _sizes(root: Path, dataset: str) -> dict[str, int]:
    ds = load_datasets(root, [dataset])[dataset]
    assert not ds.problems, [str(p) for p in ds.problems]
    return {split: len(frame) for split, frame in ds.splits.items()}


def _mami_zips(synth: Path, tmp: Path) -> tuple[Path, Path]:
    """An outer zip with an odd top folder holding training.zip (+ macOS junk) and test/; test_labels.txt apart."""
    inner = io.BytesIO()
    with zipfile.ZipFile(inner, "w") as zf:
        for name, data in _files(synth / "MAMI" / "TRAINING", "TRAINING/").items():
            zf.writestr(name, data)
        zf.writestr("__MACOSX/TRAINING/._training.csv", b"junk")
        zf.writestr("TRAINING/.DS_Store", b"junk")
    files = {"MAMI DATASET/": b"", "MAMI DATASET/training.zip": inner.getvalue()}
    files.update(_files(synth / "MAMI" / "test", "MAMI DATASET/test/"))
    files["MAMI DATASET/test/._Test.csv"] = b"junk"
    outer = _zip(tmp / "MAMI DATASET.zip", files)
    labels = tmp / "test_labels.txt"
    shutil.copy(synth / "MAMI" / "test_labels.txt", labels)
    return outer, labels


# ----------------------------------------------------------------------------- layouts


def test_mami_odd_top_folder_nested_zip_and_labels_file(synth, tmp_path):
    outer, labels = _mami_zips(synth, tmp_path)
    root = tmp_path / "data"
    summary = unpack_mami([outer, labels], root, progress=False)
    assert summary["written"] == ["TRAINING", "test", "test_labels.txt"]
    assert summary["parts"]["TRAINING"]["rows"] == 30 and summary["parts"]["TRAINING"]["images"] == 30
    assert summary["parts"]["test"]["rows"] == 12 and summary["parts"]["test"]["images"] == 12
    assert _sizes(root, "MAMI") == _sizes(synth, "MAMI")
    names = [p.name for p in root.rglob("*")]
    assert not [n for n in names if n.startswith("._") or n in ("__MACOSX", ".DS_Store", "training.zip")]
    assert sorted(p.name for p in root.iterdir()) == ["MAMI"]  # no partial / old folders left
    assert ((root / "MAMI" / "TRAINING" / "training.csv").read_bytes()
            == (synth / "MAMI" / "TRAINING" / "training.csv").read_bytes())


def test_mami_flat_zip_keeps_test_folder_out_of_training(synth, tmp_path):
    files = _files(synth / "MAMI" / "TRAINING", "")  # training.csv at the zip's root ...
    files.update(_files(synth / "MAMI" / "test", "test/"))  # ... with the test set below it
    files["test_labels.txt"] = (synth / "MAMI" / "test_labels.txt").read_bytes()
    root = tmp_path / "data"
    unpack_mami(_zip(tmp_path / "all.zip", files), root, progress=False)
    assert not (root / "MAMI" / "TRAINING" / "test").exists()
    assert not (root / "MAMI" / "TRAINING" / "test_labels.txt").exists()
    assert _sizes(root, "MAMI") == _sizes(synth, "MAMI")


def test_fbhm_data_folder(synth, tmp_path):
    files = _files(synth / "FBHM", "hateful_memes/data/")
    files["hateful_memes/data/README.md"] = b"readme"
    files["hateful_memes/LICENSE.txt"] = b"license"
    root = tmp_path / "data"
    summary = unpack_fbhm(_zip(tmp_path / "hateful_memes.zip", files), root, progress=False)
    assert summary["written"] == ["FBHM"] and summary["parts"]["FBHM"]["images"] == 18
    assert sorted(p.name for p in (root / "FBHM").iterdir()) == ["dev_seen.jsonl", "img", "train.jsonl"]
    assert _sizes(root, "FBHM") == _sizes(synth, "FBHM")


# ----------------------------------------------------------------------------- bad archives


def test_missing_archive_names_the_path(tmp_path):
    path = tmp_path / "drive" / "MyDrive" / "TRAINING.zip"
    with pytest.raises(MamikitError, match="not found") as err:
        unpack_mami(path, tmp_path / "data", progress=False)
    assert str(path) in str(err.value) and "Drive" in str(err.value)
    path.parent.mkdir(parents=True)
    (path.parent / "training (1).zip").write_bytes(b"x")
    with pytest.raises(MamikitError, match=r"zips in .*training \(1\)\.zip"):
        unpack_mami(path, tmp_path / "data", progress=False)


def test_not_a_zip_and_empty_file(tmp_path):
    bad = tmp_path / "TRAINING.zip"
    bad.write_bytes(b"<html>quota exceeded</html>")
    with pytest.raises(MamikitError, match="not a zip archive"):
        unpack_mami(bad, tmp_path / "data", progress=False)
    bad.write_bytes(b"")
    with pytest.raises(MamikitError, match="is empty"):
        unpack_fbhm(bad, tmp_path / "data", progress=False)
    assert not (tmp_path / "data" / "MAMI").exists()


def test_password_needed_wrong_and_right(synth, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    files = _files(synth / "MAMI" / "TRAINING", "TRAINING/")
    archive = _raw_zip(tmp_path / "TRAINING.zip", files, password=PASSWORD.encode())
    root = tmp_path / "data"
    with pytest.raises(MamikitError, match="password-protected"):
        unpack_mami(archive, root, progress=False)
    with pytest.raises(MamikitError, match="wrong password for .*TRAINING.zip"):
        unpack_mami(archive, root, password="not-it", progress=False)
    assert not (root / "MAMI").exists() and not (root / ".MAMI.partial").exists()
    calls = []
    summary = unpack_mami(archive, root, password=lambda: calls.append(1) or PASSWORD, progress=False)
    assert calls == [1] and summary["parts"]["TRAINING"]["images"] == 30
    assert summary["not_found"] == ["test", "test_labels.txt"]
    for p in (root / "MAMI" / "TRAINING").iterdir():
        assert p.read_bytes() == files["TRAINING/" + p.name]
    # the password is nowhere: not in the summary, the log or any file written
    assert PASSWORD not in repr(summary) and PASSWORD not in caplog.text
    assert not [p for p in root.rglob("*") if p.is_file() and PASSWORD.encode() in p.read_bytes()]
    # bytes work too, and an unencrypted archive never asks
    unpack_mami(archive, tmp_path / "data2", password=PASSWORD.encode(), progress=False)
    plain = _zip(tmp_path / "plain.zip", files)
    unpack_mami(plain, tmp_path / "data3", password=lambda: pytest.fail("asked for a password"), progress=False)


@pytest.mark.skipif(shutil.which("zip") is None, reason="the zip command-line tool is not installed")
def test_password_zip_written_by_the_zip_tool(synth, tmp_path):
    work = tmp_path / "work" / "MAMI DATASET"
    shutil.copytree(synth / "MAMI" / "test", work / "test")
    archive = tmp_path / "test.zip"
    subprocess.run(["zip", "-q", "-r", "-P", PASSWORD, str(archive), "MAMI DATASET"], cwd=work.parent, check=True)
    with pytest.raises(MamikitError, match="wrong password"):
        unpack_mami(archive, tmp_path / "data", password="wrong", progress=False)
    summary = unpack_mami(archive, tmp_path / "data", password=PASSWORD, progress=False)
    assert summary["written"] == ["test"] and summary["parts"]["test"]["images"] == 12


@pytest.mark.parametrize("method, words", [(99, "AES"), (9, "compression method 9")])
def test_aes_and_unsupported_compression_advise_7zip(tmp_path, method, words):
    archive = _raw_zip(tmp_path / "TRAINING.zip", {"TRAINING/training.csv": b"file_name\n"},
                       password=b"pw" if method == 99 else None, method=method)
    with pytest.raises(MamikitError, match=words) as err:
        unpack_mami(archive, tmp_path / "data", password="pw", progress=False)
    assert "7-Zip" in str(err.value) and "unpacked folder" in str(err.value)


def test_folder_unpacked_by_hand_is_accepted(synth, tmp_path):
    shutil.copytree(synth / "MAMI" / "TRAINING", tmp_path / "by-hand" / "TRAINING")
    summary = unpack_mami(tmp_path / "by-hand", tmp_path / "data", progress=False)
    assert summary["written"] == ["TRAINING"] and summary["parts"]["TRAINING"]["images"] == 30


def test_incomplete_archive_lists_missing_images(synth, tmp_path):
    files = _files(synth / "MAMI" / "TRAINING", "TRAINING/")
    images = sorted(n for n in files if n.endswith(".jpg"))
    for name in images[:2]:
        del files[name]
    archive = _zip(tmp_path / "TRAINING.zip", files)
    gone = [n.split("/")[-1] for n in images[:2]]
    with pytest.raises(MamikitError, match="incomplete: 2 of the 30 images") as err:
        unpack_mami(archive, tmp_path / "data", progress=False)
    assert all(g in str(err.value) for g in gone)
    assert not (tmp_path / "data" / "MAMI").exists()
    summary = unpack_mami(archive, tmp_path / "data", progress=False, allow_incomplete=True)
    assert sorted(summary["parts"]["TRAINING"]["missing"]) == gone
    problems = load_datasets(tmp_path / "data", ["MAMI"])["MAMI"].problems
    assert sorted(p.file for p in problems) == gone


def test_archive_without_the_expected_files_says_what_it_holds(tmp_path):
    archive = _zip(tmp_path / "photos.zip", {"holiday/a.jpg": b"x", "notes.txt": b"y"})
    with pytest.raises(MamikitError, match=r"no training\.csv or Test\.csv or test_labels\.txt found") as err:
        unpack_mami(archive, tmp_path / "data", progress=False)
    assert "holiday/" in str(err.value) and "notes.txt" in str(err.value)
    with pytest.raises(MamikitError, match=r"no train\.jsonl found"):
        unpack_fbhm(archive, tmp_path / "data", progress=False)


@pytest.mark.parametrize("evil", ["TRAINING/../../evil.jpg", "/tmp/mamikit-evil.jpg"])
def test_member_escaping_the_folder_is_rejected(tmp_path, evil):
    archive = _zip(tmp_path / "TRAINING.zip", {"TRAINING/training.csv": b"file_name\tmisogynous\n", evil: b"evil"})
    with pytest.raises(MamikitError, match="outside the data folder"):
        unpack_mami(archive, tmp_path / "data", progress=False)
    assert not [p for p in tmp_path.rglob("evil*")] and not Path("/tmp/mamikit-evil.jpg").exists()


def test_synthetic_folder_is_refused(synth, tmp_path):
    outer, labels = _mami_zips(synth, tmp_path)
    with pytest.raises(MamikitError, match="synthetic"):
        unpack_mami([outer, labels], synth, progress=False)


# ----------------------------------------------------------------------------- re-runs


def test_rerun_is_skipped_and_overwrite_redoes(synth, tmp_path):
    outer, labels = _mami_zips(synth, tmp_path)
    root = tmp_path / "data"
    unpack_mami([outer, labels], root, progress=False)
    outer.unlink()  # a complete folder is not even compared with its archive
    again = unpack_mami([outer, labels], root, progress=False)
    assert again["skipped"] == ["TRAINING", "test", "test_labels.txt"] and again["written"] == []
    assert again["parts"]["TRAINING"]["images"] == 30
    # a part missing on disk is unpacked again, the others are skipped
    outer, labels = _mami_zips(synth, tmp_path)
    os.remove(next((root / "MAMI" / "test").glob("*.jpg")))
    partly = unpack_mami([outer, labels], root, progress=False)
    assert partly["written"] == ["test"] and partly["skipped"] == ["TRAINING", "test_labels.txt"]
    redo = unpack_mami([outer, labels], root, progress=False, overwrite=True)
    assert redo["written"] == ["TRAINING", "test", "test_labels.txt"]
    assert _sizes(root, "MAMI") == _sizes(synth, "MAMI")
    assert sorted(p.name for p in root.iterdir()) == ["MAMI"]


def test_interrupted_unpack_leaves_no_half_folder(synth, tmp_path, monkeypatch):
    outer, labels = _mami_zips(synth, tmp_path)
    root = tmp_path / "data"
    copy, calls = archives._copy, []

    def interrupted(*args):
        calls.append(1)
        if len(calls) == 20:
            raise KeyboardInterrupt
        copy(*args)

    monkeypatch.setattr(archives, "_copy", interrupted)
    with pytest.raises(KeyboardInterrupt):
        unpack_mami([outer, labels], root, progress=False)
    assert not (root / "MAMI").exists() and sorted(p.name for p in root.iterdir()) == []
    monkeypatch.setattr(archives, "_copy", copy)
    unpack_mami([outer, labels], root, progress=False)
    before = (root / "MAMI" / "TRAINING" / "training.csv").read_bytes()
    # an interrupted overwrite keeps the previous complete version in place
    calls.clear()
    monkeypatch.setattr(archives, "_copy", interrupted)
    with pytest.raises(KeyboardInterrupt):
        unpack_mami([outer, labels], root, progress=False, overwrite=True)
    monkeypatch.setattr(archives, "_copy", copy)
    assert (root / "MAMI" / "TRAINING" / "training.csv").read_bytes() == before
    assert _sizes(root, "MAMI") == _sizes(synth, "MAMI")
    # a run killed outright leaves .MAMI.partial behind; the next run clears it
    (root / ".MAMI.partial" / "TRAINING").mkdir(parents=True)
    (root / ".MAMI.partial" / "TRAINING" / "half.jpg").write_bytes(b"half")
    unpack_mami([outer, labels], root, progress=False, overwrite=True)
    assert sorted(p.name for p in root.iterdir()) == ["MAMI"]
    assert not (root / "MAMI" / "TRAINING" / "half.jpg").exists()


def test_run_killed_while_installing_is_recovered(synth, tmp_path):
    outer, labels = _mami_zips(synth, tmp_path)
    root = tmp_path / "data"
    unpack_mami([outer, labels], root, progress=False)
    # killed between moving the old TRAINING aside and moving the new one in
    (root / ".MAMI.old").mkdir()
    os.replace(root / "MAMI" / "TRAINING", root / ".MAMI.old" / "TRAINING")
    summary = unpack_mami([outer, labels], root, progress=False)
    assert summary["skipped"] == ["TRAINING", "test", "test_labels.txt"]
    assert sorted(p.name for p in root.iterdir()) == ["MAMI"]


def test_ask_password_uses_getpass(monkeypatch):
    prompts = []
    monkeypatch.setattr(archives.getpass, "getpass", lambda prompt: prompts.append(prompt) or "pw")
    assert ask_password() == "pw" and prompts == ["MAMI zip password: "]
    monkeypatch.setattr(archives.getpass, "getpass", lambda prompt: "")
    with pytest.raises(MamikitError, match="no password"):
        ask_password("FBHM zip password: ")
