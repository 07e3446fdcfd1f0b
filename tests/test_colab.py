"""Colab's traps, one test each: settings on Drive, relative folders, the install line, the store's local copy."""

from __future__ import annotations

import json
import sys
import types

import pytest

import mamikit as mk
from mamikit import colab, store
from mamikit.settings import Settings, load_settings
from mamikit.utils import MamikitError


@pytest.fixture
def on_colab(tmp_path, monkeypatch):
    """A Colab runtime as mamikit sees it: google.colab imported, the VM's folder a temporary one."""
    monkeypatch.setitem(sys.modules, "google.colab", types.ModuleType("google.colab"))
    monkeypatch.setenv(colab.CONTENT_ENV, str(tmp_path / "content"))
    monkeypatch.delenv("MAMIKIT_SETTINGS", raising=False)
    return tmp_path / "content"


def test_without_the_setup_notebook_a_colab_notebook_stops_instead_of_running_the_demo(on_colab):
    with pytest.raises(MamikitError, match="00_setup"):
        load_settings()


def test_on_colab_a_relative_folder_is_an_error_naming_the_setting(on_colab):
    with pytest.raises(MamikitError, match="features_root 'runs/paper/features' is relative"):
        Settings(profile="paper", run_root=str(on_colab / "drive/MyDrive/p"), features_root="runs/paper/features")
    with pytest.raises(MamikitError, match="run_root is not set.*00_setup"):
        Settings(profile="paper")


def test_elsewhere_relative_defaults_stay(monkeypatch):
    monkeypatch.delitem(sys.modules, "google.colab", raising=False)
    settings = Settings(profile="demo", run_root="somewhere")
    assert (settings.data_root, settings.features_root) == ("somewhere/data", "somewhere/features")


def test_setup_writes_the_settings_every_notebook_finds_and_folders_default_under_the_project(on_colab, tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "pyproject.toml").write_text("[project]\nname = 'mamikit'\n")
    project = on_colab / "drive/MyDrive/study"
    written = mk.colab_setup(str(project), str(repo), profile="demo", seeds=[0, 1], rounds=[1], epochs=1)
    assert colab.settings_path() == on_colab / "drive/MyDrive/mamikit/settings.json"
    assert json.loads(colab.settings_path().read_text())["install"] == f"mamikit[demo] @ {repo.as_uri()}"
    read = load_settings()  # no path: the file 00_setup wrote
    assert read == written
    assert (read.run_root, read.data_root, read.features_root) == (
        str(project / "demo"), str(project / "demo/data"), str(project / "demo/features"))
    assert read.seeds == (0, 1) and read.rounds == (1,) and read.train.epochs == 1
    # a second set-up without SOURCE keeps the install line, and the paper profile needs no extra
    again = mk.colab_setup(str(project), None, profile="paper")
    assert again.install == f"mamikit[demo] @ {repo.as_uri()}" and again.run_root == str(project / "paper")
    assert colab.install_requirement("git+https://github.com/o/mamikit@v1", "paper") == \
        "mamikit @ git+https://github.com/o/mamikit@v1"


@pytest.mark.parametrize("source, reason", [("", "say where"), ("repo", "relative"), ("/nonexistent", "pyproject")])
def test_a_bad_install_source_is_named(source, reason):
    with pytest.raises(MamikitError, match=reason):
        colab.install_requirement(source, "paper")


def test_the_rounds_name_the_datasets_they_need_and_a_missing_one_is_an_error(tmp_path):
    (tmp_path / "MAMI").mkdir()
    assert Settings(rounds=[1, 2, 3]).datasets() == ("MAMI",)
    assert Settings(rounds=[4]).datasets() == ("MAMI", "FBHM")
    mk.require_datasets(tmp_path, ("MAMI",))
    with pytest.raises(MamikitError, match=r"no FBHM folder.*FBHM: set FBHM_ZIP"):
        mk.require_datasets(tmp_path, ("MAMI", "FBHM"), where={"FBHM": "set FBHM_ZIP"})
    with pytest.raises(MamikitError, match="rounds must name rounds"):
        Settings(rounds=[9])


def test_the_rounds_name_the_profiles_whose_stores_02_extracts_and_a_left_out_round_is_refused():
    assert [p.name for p in Settings(rounds=[1, 2, 3, 4]).profiles()] == ["demo"]
    assert [p.name for p in Settings(rounds=[4, 5]).profiles()] == ["demo", "demo-vit-l-14"]  # 41's, tiny
    paper = Settings(profile="paper", weights="random", rounds=[5]).profiles()
    assert [(p.name, p.weights) for p in paper] == [("paper", "random"), ("vit-l-14", "random")]
    Settings(rounds=[5]).require_round(5)
    with pytest.raises(MamikitError, match=r"round 5 is not among the rounds \[1, 2, 3, 4\]; add it"):
        Settings().require_round(5)


def test_the_runtime_report_names_absolute_folders_the_device_and_the_versions(tmp_path):
    report = mk.runtime_report(Settings(run_root=str(tmp_path / "r")))
    assert report["folders"]["feature store"] == str(tmp_path / "r/features")
    assert report["device"]["device"] in ("cpu", "cuda") and report["versions"]["mamikit"] == mk.__version__
    assert report["versions"]["torch"]


# ----------------------------------------------------------------------------- the store's local copy


def test_the_local_copy_of_the_store_is_verified_resumable_and_refuses_a_damaged_file(tiny_store, tmp_path):
    import shutil

    tiny_store = shutil.copytree(tiny_store, tmp_path / "drive-store")  # this test damages its store
    local = tmp_path / "vm"
    copy = store.local_copy(tiny_store, local)
    source_files = sorted(p.relative_to(tiny_store) for p in tiny_store.rglob("*") if p.is_file()
                          and not p.name.startswith("."))
    assert sorted(p.relative_to(copy) for p in copy.rglob("*") if p.is_file() and p.suffix in (".safetensors", ".txt")
                  ) == [p for p in source_files if p.suffix in (".safetensors", ".txt")]
    for rel in source_files:
        if rel.suffix == ".safetensors":
            assert (copy / rel).read_bytes() == (tiny_store / rel).read_bytes()
    features = store.FeatureStore(copy)
    ds, sp = features.splits()[0]
    assert features.load(ds, sp).ids == store.FeatureStore(tiny_store).load(ds, sp).ids

    # a copy cut part-way (manifest not yet written, one file missing) resumes: only that file is copied again
    record = json.loads((copy / store.COPY_RECORD).read_text())
    first, *rest = sorted(record)
    (copy / store.MANIFEST).unlink()
    (copy / first).unlink()
    untouched = {rel: (copy / rel).stat().st_mtime_ns for rel in rest}
    assert store.local_copy(tiny_store, local) == copy
    assert (copy / first).is_file() and {rel: (copy / rel).stat().st_mtime_ns for rel in rest} == untouched

    # a source file whose bytes no longer match the manifest's hash is refused, naming it
    manifest = json.loads((tiny_store / store.MANIFEST).read_text())
    entry = next(iter(next(iter(manifest["datasets"].values())).values()))["backbones"]["clip"]
    damaged = tiny_store / entry["file"]
    data = bytearray(damaged.read_bytes())
    data[-1] ^= 0xFF
    damaged.write_bytes(bytes(data))
    (copy / store.MANIFEST).unlink()
    (copy / store.COPY_RECORD).unlink()
    with pytest.raises(MamikitError, match=f"{damaged.name}.*damaged"):
        store.local_copy(tiny_store, local)


def test_training_with_local_store_reads_the_copy_and_records_the_source(tiny_data, tiny_store, tmp_path):
    from mamikit.settings import TrainConfig
    from mamikit.train import train, training_store

    cfg = TrainConfig(epochs=1, batch_size=8, accumulation=1, evals_per_epoch=1, local_store=True,
                      local_dir=str(tmp_path / "vm"))
    assert training_store(tiny_store, cfg).is_relative_to(tmp_path / "vm")
    out = train("00", tiny_data, tiny_store, tmp_path / "run", profile="demo", train_cfg=cfg)
    config = json.loads((out / "config.json").read_text())
    assert config["features"] == str(tiny_store.resolve()) and "local_store" not in config["train"]
    assert training_store(tiny_store, TrainConfig(local_store=False)) == tiny_store
