"""The repository's own documents stay what the code cites: docs/design.md and docs/fidelity.md.

Code, tests, notebooks and benchmarks cite design.md by section and fidelity.md
by row; these tests fail when a cited section or row is missing, when the data
flow of design.md names a module that does not exist or leaves one out, and
when a citation points at a document outside the repository.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DESIGN = ROOT / "docs" / "design.md"
FIDELITY = ROOT / "docs" / "fidelity.md"
POINTS = "## The authors' code, point by point"


def cited_texts() -> dict[Path, str]:
    """Every file that may cite the documents: the package, tests, benchmarks, notebooks and markdown."""
    paths = [*ROOT.glob("mamikit/*.py"), *ROOT.glob("tests/*.py"), *ROOT.glob("bench/*.py"),
             *ROOT.glob("notebooks/*.ipynb"), *ROOT.glob("*.md"), *ROOT.glob("docs/*.md")]
    return {p: p.read_text(encoding="utf-8") for p in paths if p.resolve() != Path(__file__).resolve()}


def fidelity_points(doc: str) -> set[int]:
    """The row numbers of the point-by-point section of fidelity.md (`N. **title.**` items)."""
    section = doc.split(POINTS, 1)[1].split("\n## ", 1)[0]
    return {int(n) for n in re.findall(r"^(\d+)\. \*\*", section, flags=re.MULTILINE)}


def test_fidelity_points_are_numbered_one_by_one():
    points = fidelity_points(FIDELITY.read_text(encoding="utf-8"))
    assert points == set(range(1, max(points) + 1))


def test_every_cited_fidelity_row_is_a_point_of_fidelity_md():
    doc = FIDELITY.read_text(encoding="utf-8")
    points = fidelity_points(doc)
    table = {int(n) for n in re.findall(r"^\| (\d+) \|", doc, flags=re.MULTILINE)}  # the switch table's rows
    assert table <= points
    cited = {}
    numbers = r"((?:\d+(?:,\s+|\s+and\s+)?)+)"  # "11", "12, 18", "12 and 18", across a line break too
    patterns = (r"fidelity\.md\s+rows?\s+" + numbers, r"\brows?\s+" + numbers + r"\s+of\s+docs/fidelity\.md")
    for path, text in cited_texts().items():
        for pattern in patterns:
            for numbers in re.findall(pattern, text):
                for n in re.findall(r"\d+", numbers):
                    cited.setdefault(int(n), set()).add(path.relative_to(ROOT).as_posix())
    assert cited, "no citation of docs/fidelity.md found: the pattern no longer matches the code's citations"
    missing = {n: sorted(where) for n, where in cited.items() if n not in points}
    assert not missing


def test_every_cited_design_section_exists():
    headings = set(re.findall(r"^#{2,3} (.+)$", DESIGN.read_text(encoding="utf-8"), flags=re.MULTILINE))
    cited = {}
    for path, text in cited_texts().items():
        for section in re.findall(r'docs/design\.md "([^"]+)"', text):
            cited.setdefault(section, set()).add(path.relative_to(ROOT).as_posix())
    assert {"Run directory", "Data flow", "Profiles"} <= set(cited)
    assert {s: sorted(w) for s, w in cited.items() if s not in headings} == {}


def test_nothing_cites_a_document_outside_the_repository():
    outside = [p.relative_to(ROOT).as_posix() for p, text in cited_texts().items()
               if re.search(r"\bDESIGN\.md\b|AUTHORS_SYSTEM", text)]
    assert outside == []


def test_the_data_flow_of_design_md_names_every_module_and_only_real_ones():
    doc = DESIGN.read_text(encoding="utf-8")
    flow = doc.split("## Data flow", 1)[1].split("\n#", 1)[0]
    named = set(re.findall(r"\b([a-z_]+)\.py\b", flow))
    modules = {p.stem for p in (ROOT / "mamikit").glob("*.py")}
    assert named == modules
