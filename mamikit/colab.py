"""Colab: where a runtime keeps things, the set-up notebook's settings file, and what the runtime has.

A Colab runtime is a VM whose disk is lost at every reset; Drive, mounted at
``/content/drive``, is what survives. So on Colab:

- ``notebooks/00_setup.ipynb`` (``settings.colab_setup``) writes the settings file to one fixed
  place on Drive, :data:`COLAB_SETTINGS`, and every other notebook reads it from there
  without an edit (``settings.load_settings``); without it a notebook stops with an
  error naming 00_setup, never a silent demo.
- every folder of the settings is absolute (a relative one would land on the VM's disk
  and be lost with it): a relative path is an error naming the setting.
- the settings file also records the pip requirement the notebooks' first cell
  installs mamikit with (``Settings.install``), so the install source is set once.

The VM's root is ``/content``; ``$MAMIKIT_CONTENT`` names another (the simulated
Colab of the test suite uses a temporary folder).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

CONTENT_ENV = "MAMIKIT_CONTENT"
COLAB_SETTINGS = "/content/drive/MyDrive/mamikit/settings.json"  # where 00_setup writes the settings file
DEFAULT_PROJECT = "/content/drive/MyDrive/mamikit"  # the Drive folder everything goes under, unless 00 names another
LIBRARIES = ("torch", "torchvision", "open_clip_torch", "transformers", "numpy", "pandas", "ipywidgets")


def on_colab() -> bool:
    """Whether this Python runs on a Colab runtime (its `google.colab` package is imported by then)."""
    return "google.colab" in sys.modules


def content_dir() -> Path:
    """The VM's working folder: /content, or $MAMIKIT_CONTENT."""
    return Path(os.environ.get(CONTENT_ENV) or "/content")


def drive_path(path) -> Path:
    """A /content/... path with the VM's folder replaced by :func:`content_dir` (the same path on Colab)."""
    path = Path(path)
    parts = path.parts
    if len(parts) >= 2 and parts[0] == "/" and parts[1] == "content":
        return content_dir().joinpath(*parts[2:])
    return path


def settings_path() -> Path:
    """Where 00_setup writes the settings file and the other notebooks read it (:data:`COLAB_SETTINGS`)."""
    return drive_path(COLAB_SETTINGS)


def install_requirement(source: str, profile: str) -> str:
    """The pip requirement that installs mamikit from `source` with the extras `profile` needs.

    Args:
        source: a git URL (``git+https://github.com/<owner>/mamikit``, optionally ``@<branch or commit>``) or a
            folder holding a copy of the repository (e.g. on Drive).
        profile: a tiny profile (``demo``, ``demo-vit-l-14``, ...) adds the demo extra (its offline text model
            and papermill); ``paper`` and the other full profiles need none.
    """
    from .utils import MamikitError

    source = str(source).strip()
    if not source:
        raise MamikitError("SOURCE: say where mamikit is installed from (a git URL or a folder with the repository)")
    if "://" not in source and not source.startswith("git+"):
        folder = Path(source)
        if not folder.is_absolute():
            raise MamikitError(f"SOURCE: {source!r} is a relative folder; give the absolute path of the repository")
        if not (folder / "pyproject.toml").is_file():
            raise MamikitError(f"SOURCE: {folder} holds no pyproject.toml; give the folder of the repository copy")
        source = folder.as_uri()
    from .profiles import is_tiny, profile_names

    extras = "[demo]" if profile in profile_names() and is_tiny(profile) else ""
    return f"mamikit{extras} @ {source}"


def versions() -> dict[str, str | None]:
    """mamikit's version and commit, Python's, and the libraries' that decide the numbers."""
    import platform
    from importlib import metadata

    from . import __version__
    from .provenance import git_commit

    found = {"mamikit": __version__, "commit": git_commit(), "package": str(Path(__file__).resolve().parent),
             "python": platform.python_version()}
    for dist in LIBRARIES:
        try:
            found[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            found[dist] = None
    return found


def installed() -> str:
    """One line for the set-up cells: mamikit's version, commit and folder."""
    found = versions()
    return f"mamikit {found['mamikit']} (commit {found['commit'] or 'unknown'}) at {found['package']}"


def device_report() -> dict:
    """The accelerator this runtime has: GPU name, memory, bf16 support, CUDA version; or the CPU."""
    import torch

    if not torch.cuda.is_available():
        return {"device": "cpu", "gpu": None, "note": "no GPU: Runtime > Change runtime type > GPU to train at speed"}
    props = torch.cuda.get_device_properties(0)
    return {"device": "cuda", "gpu": props.name, "memory_gib": round(props.total_memory / 2**30, 1),
            "bf16": bool(torch.cuda.is_bf16_supported()), "cuda": torch.version.cuda,
            "compute_capability": f"{props.major}.{props.minor}"}


def runtime_report(settings) -> dict:
    """What 00_setup prints: the settings file, the absolute folders in effect, the device and the versions."""
    return {
        "settings file": str(settings_path()) if on_colab() else os.environ.get("MAMIKIT_SETTINGS"),  # as read
        "folders": {"data": str(Path(settings.data_root).resolve()),
                    "feature store": str(Path(settings.features_root).resolve()),
                    "runs": str(settings.runs.resolve()), "report": str(settings.report.resolve())},
        "install": settings.install,
        "device": device_report(),
        "versions": versions(),
    }
