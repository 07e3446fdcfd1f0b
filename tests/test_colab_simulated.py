"""A researcher's Colab day, simulated: notebooks 00-09 each in a fresh runtime that keeps only Drive.

The simulation:
- a fake `google.colab` package, imported at kernel start as on Colab: `drive.mount` links the mount point to a
  folder that plays Drive, the widget manager call does nothing;
- the VM: `$MAMIKIT_CONTENT` (Colab's /content, the notebooks' working folder), its temp folder and a fresh
  Python environment whose preinstalled libraries are those of the test environment (Colab's torch and the rest);
- before every notebook the VM is reset: its folders and the environment are wiped and made anew, so each
  notebook's set-up cell installs mamikit again, for real, with the pip line 00_setup recorded, from a copy of the
  repository on the fake Drive;
- 00_setup writes the settings file on Drive; no other notebook is given SETTINGS.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import nbformat
import pytest

from mamikit.notebooks import SMALL_PARAMETERS, notebook_paths

ROOT = Path(__file__).resolve().parent.parent

FAKE_COLAB = {
    "__init__.py": '"""A stand-in for Colab\'s google.colab package (mamikit tests)."""\n',
    "drive.py": '''"""drive.mount links the mount point to the folder that plays Drive."""
import os


def mount(mountpoint, force_remount=False):
    storage = os.environ["FAKE_DRIVE_STORAGE"]
    os.makedirs(os.path.join(storage, "MyDrive"), exist_ok=True)
    if not os.path.islink(mountpoint):
        os.makedirs(os.path.dirname(mountpoint), exist_ok=True)
        os.symlink(storage, mountpoint)
    print("Mounted at", mountpoint)
''',
    "output.py": '''"""The widget manager switch: nothing to do outside Colab's front end."""


def enable_custom_widget_manager():
    pass
''',
}


class Colab:
    """The folders of the simulation and the kernel that runs each notebook."""

    def __init__(self, root: Path):
        self.root = root
        self.storage = root / "drive-storage"  # what Drive keeps across resets
        self.vm = root / "vm"
        self.content = self.vm / "content"
        self.local = self.vm / "tmp"
        self.venv = self.vm / "venv"
        self.drive = self.content / "drive" / "MyDrive"
        self.kernels = root / "jupyter"
        fake = root / "colab-package" / "google" / "colab"
        fake.mkdir(parents=True)
        for name, text in FAKE_COLAB.items():
            (fake / name).write_text(text)
        startup = root / "ipython" / "profile_default" / "startup"
        startup.mkdir(parents=True)
        (startup / "00-colab.py").write_text("import google.colab  # a Colab kernel has it imported\n")
        self.storage.mkdir()
        self.left_outside: dict[str, list[str]] = {}

    def reset(self) -> None:
        """A new runtime: the VM's folders and Python environment wiped; Drive untouched."""
        shutil.rmtree(self.vm, ignore_errors=True)
        self.content.mkdir(parents=True)
        self.local.mkdir()
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(self.venv)], check=True)
        site = Path(subprocess.run([str(self.venv / "bin" / "python"), "-c",
                                    "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                   check=True, capture_output=True, text=True).stdout.strip())
        # Colab's preinstalled libraries (torch, transformers, ...): this environment's, mamikit not among them
        (site / "colab_preinstalled.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
        spec = self.kernels / "kernels" / "colab"
        spec.mkdir(parents=True, exist_ok=True)
        env = {"PYTHONPATH": str(self.root / "colab-package"), "IPYTHONDIR": str(self.root / "ipython"),
               "FAKE_DRIVE_STORAGE": str(self.storage), "MAMIKIT_CONTENT": str(self.content),
               "MAMIKIT_LOCAL": str(self.local), "TMPDIR": str(self.local), "MPLBACKEND": "Agg",
               # the dependencies are there already; mamikit is built with the preinstalled setuptools
               "PIP_NO_INDEX": "1", "PIP_NO_BUILD_ISOLATION": "0", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
        (spec / "kernel.json").write_text(json.dumps({
            "argv": [str(self.venv / "bin" / "python"), "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "simulated Colab", "language": "python", "env": env}))

    def run(self, path: Path, parameters: dict, out: Path) -> nbformat.NotebookNode:
        import papermill as pm

        self.reset()
        pm.execute_notebook(str(path), str(out), parameters=parameters, kernel_name="colab", cwd=str(self.content),
                            progress_bar=False)
        outside = [str(p.relative_to(self.vm)) for p in self.vm.rglob("*") if p.is_file()
                   and not p.is_relative_to(self.venv) and not p.is_relative_to(self.content / "drive")]
        self.left_outside[path.stem] = outside
        return nbformat.read(str(out), as_version=4)


@pytest.fixture(scope="module")
def colab_day(tmp_path_factory, monkeypatch_module):
    root = tmp_path_factory.mktemp("colab")
    colab = Colab(root)
    monkeypatch_module.setenv("JUPYTER_PATH", str(colab.kernels))
    # the researcher's copy of the repository on Drive: the files git tracks
    code = colab.storage / "code" / "mamikit"
    tracked = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z"], capture_output=True, check=True).stdout
    for rel in filter(None, tracked.decode().split("\0")):
        if (ROOT / rel).is_file():
            (code / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, code / rel)
    project = colab.content / "drive" / "MyDrive" / "study"
    source = colab.content / "drive" / "code" / "mamikit"
    executed, stores_copied = {}, {}
    (root / "executed").mkdir()
    # round 5 (10) is the settings' choice (`rounds`), left at the paper's four here; the headless demo runs it
    for path in notebook_paths():
        if path.stem.startswith("10"):
            continue
        if path.stem.startswith("00"):
            params = {"PROJECT": str(project), "SOURCE": str(source), "PROFILE": "demo", "SEEDS": [0],
                      "OVERRIDES": {"epochs": 1}}
        elif path.stem.startswith("01"):
            params = dict(SMALL_PARAMETERS)
        else:
            params = {}
        executed[path.stem] = colab.run(path, params, root / "executed" / path.name)
        stores_copied[path.stem] = (colab.local / "mamikit-stores").is_dir()
    return colab, project, executed, stores_copied


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def _text(nb) -> str:
    return "\n".join(str(o.get("text", "")) + json.dumps(o.get("data", {})) for c in nb.cells
                     if c.cell_type == "code" for o in c.outputs)


def test_every_notebook_runs_in_its_own_runtime_from_what_the_earlier_ones_left_on_drive(colab_day):
    colab, project, executed, stores_copied = colab_day
    assert list(executed) == [p.stem for p in notebook_paths() if not p.stem.startswith("10")]
    settings = json.loads((colab.storage / "MyDrive" / "mamikit" / "settings.json").read_text())
    assert settings["run_root"] == str(project / "demo") and settings["install"].startswith("mamikit[demo] @ file:")
    demo = colab.storage / "MyDrive" / "study" / "demo"
    assert (demo / "data" / "MAMI").is_dir() and (demo / "features" / "demo" / "manifest.json").is_file()
    assert {p.name for p in (demo / "runs").iterdir()} >= {"round1", "round2", "round3", "round4"}
    assert list((demo / "report").glob("table2*.md")) and list((demo / "report").rglob("*.png"))
    assert list((demo / "runs").rglob("answer.zip")) or list((demo / "report").rglob("*.zip"))
    # each runtime installed mamikit for real, into its own fresh environment, with 00's pip line
    for stem, nb in executed.items():
        setup = next(c for c in nb.cells if c.cell_type == "code" and "google.colab" in c.source)
        printed = "".join(o.get("text", "") for o in setup.outputs)
        assert "Mounted at" in printed and f"at {colab.venv}" in printed, (stem, printed)  # mk.installed()
    # the installed package carries its tasks and notebooks: `mamikit demo` needs no checkout
    found = subprocess.run([str(colab.venv / "bin" / "python"), "-c", "from mamikit import notebooks, registry; "
                            "print(notebooks.NOTEBOOK_DIR, registry.TASKS_PATH.is_file())"],
                           capture_output=True, text=True, check=True, cwd=colab.root).stdout.split()
    assert found[0].startswith(str(colab.venv)) and found[1] == "True"
    installed = {p.name.split("-")[0].lower() for p in colab.venv.rglob("site-packages/*")}
    assert "mamikit" in installed and not installed & {"torch", "torchvision", "transformers"}  # Colab's kept
    # the rounds trained from the store's local copy on the VM's disk, never from Drive's
    assert all(stores_copied[s] for s in executed if s[:2] in ("03", "04", "05", "06"))


def test_nothing_a_later_notebook_reads_lives_outside_drive(colab_day):
    colab, _, _, _ = colab_day
    for stem, files in colab.left_outside.items():
        kept = [f for f in files if not f.startswith("tmp/")]  # the VM's temp folder: checkpoints, store copy
        assert kept == [], f"{stem} wrote on the VM's disk: {kept[:5]}"
