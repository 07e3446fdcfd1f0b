"""The repository's own documents stay what the code cites, and the README stays a short, working entry point.

Code, tests, notebooks and benchmarks cite docs/design.md and the other guides
under docs/ by section and docs/fidelity.md by row; these tests fail when a
cited section or row is missing, when the data flow of design.md names a module
that does not exist or leaves one out, and when a citation points at a
document outside the repository. The README (for researchers on Colab) stays
under 260 lines with a contents list, every relative link in it and in docs/
reaches a file and heading, every guide under docs/ is linked from it, and its
citation is one BibTeX @inproceedings entry.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
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


def test_every_cited_section_of_the_other_guides_exists():
    cited = {}
    for path, text in cited_texts().items():
        for name, section in re.findall(r'docs/([a-z_]+)\.md "([^"]+)"', text):
            if name not in ("design", "fidelity"):
                cited.setdefault((name, section), set()).add(path.relative_to(ROOT).as_posix())
    assert ("checkpoints", "Checkpoints on Drive") in cited
    missing = {}
    for (name, section), where in cited.items():
        doc = ROOT / "docs" / f"{name}.md"
        headings = set(re.findall(r"^#{2,3} (.+)$", prose(doc.read_text(encoding="utf-8")), flags=re.MULTILINE))
        if section not in headings:
            missing[f"docs/{name}.md {section!r}"] = sorted(where)
    assert missing == {}


# ----------------------------------------------------------------------------- README and docs/ as rendered


def prose(text: str) -> str:
    """The markdown outside fenced code blocks (a `# comment` in a shell block is no heading)."""
    out, fenced = [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if not fenced:
            out.append(line)
    return "\n".join(out)


def slug(title: str) -> str:
    """The anchor GitHub gives a heading: link text kept, lower case, punctuation dropped, spaces to hyphens."""
    title = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", title.strip()).lower()
    return re.sub(r"[^\w\- ]", "", title).replace(" ", "-")


def anchors(text: str) -> set[str]:
    """Every heading anchor of a markdown file; a repeated heading gets -1, -2, ... as on GitHub."""
    seen: dict[str, int] = {}
    out = set()
    for title in re.findall(r"^#{1,6} +(.+?)\s*$", prose(text), flags=re.MULTILINE):
        base = slug(title)
        n = seen.get(base, 0)
        out.add(base if n == 0 else f"{base}-{n}")
        seen[base] = n + 1
    return out


def links(text: str) -> list[str]:
    """The targets of the markdown links and images outside code (fenced blocks and inline code spans)."""
    found = []
    for line in prose(text).splitlines():
        line = re.sub(r"`[^`]*`", "", line)
        found += re.findall(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)", line)
    return found


def test_slug_and_anchor_rules():
    assert slug("What `python -m mamikit check --data DIR` reports") == (
        "what-python--m-mamikit-check---data-dir-reports")
    assert slug("On a GPU: mixed precision, resume, the GPU check") == "on-a-gpu-mixed-precision-resume-the-gpu-check"
    assert anchors("# A\n## A\n```bash\n# not a heading\n```\n") == {"a", "a-1"}
    assert links("[x](a.md#b) `[y](no.md)` ![i](p.png)\n```\n[z](c.md)\n```") == ["a.md#b", "p.png"]


def test_readme_stays_short():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) < 260, f"README.md has {len(lines)} lines; move detail to docs/"


def test_readme_contents_list_resolves_to_its_headings():
    text = README.read_text(encoding="utf-8")
    assert "\n## Contents\n" in text
    contents = text.split("\n## Contents\n", 1)[1].split("\n#", 1)[0]
    listed = [target[1:] for target in links(contents)]
    assert len(listed) >= 6 and all(links(contents)[i].startswith("#") for i in range(len(listed)))
    assert set(listed) <= anchors(text), sorted(set(listed) - anchors(text))
    sections = {slug(s) for s in re.findall(r"^## +(.+?)\s*$", prose(text), flags=re.MULTILINE)} - {"contents"}
    assert sections <= set(listed), f"sections missing from the contents list: {sorted(sections - set(listed))}"


def test_every_relative_link_reaches_a_file_and_heading():
    broken = []
    for doc in [README, *sorted((ROOT / "docs").glob("*.md"))]:
        text = doc.read_text(encoding="utf-8")
        for target in links(text):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target, flags=re.IGNORECASE):
                continue  # a web address (https:, mailto:), not a file of the repository
            path, _, anchor = target.partition("#")
            file = (doc.parent / path).resolve() if path else doc
            where = f"{doc.relative_to(ROOT).as_posix()}: {target}"
            if not file.exists():
                broken.append(f"{where} (no such file)")
            elif anchor and file.suffix == ".md" and anchor not in anchors(file.read_text(encoding="utf-8")):
                broken.append(f"{where} (no heading with that anchor)")
    assert broken == []


def test_every_guide_under_docs_is_linked_from_the_readme():
    linked = {(ROOT / t.partition("#")[0]).resolve() for t in links(README.read_text(encoding="utf-8"))}
    orphans = [p.name for p in sorted((ROOT / "docs").glob("*.md")) if p.resolve() not in linked]
    assert orphans == []


def parse_bibtex(text: str) -> list[tuple[str, str, dict[str, str]]]:
    """(entry type, key, {field: value}) per entry; ValueError on unbalanced braces or text it cannot read."""
    entries, pos = [], 0
    for m in re.finditer(r"@(\w+)\s*\{", text):
        if m.start() < pos:
            raise ValueError(f"an @ inside the entry that ends at {pos}")
        if text[pos:m.start()].strip():
            raise ValueError(f"text outside an entry: {text[pos:m.start()].strip()[:40]!r}")
        body, pos = _braced(text, m.end() - 1)
        key, comma, rest = body.partition(",")
        if not comma or not re.fullmatch(r"[\w:.-]+", key.strip()):
            raise ValueError(f"entry without a key: {body[:40]!r}")
        fields, i = {}, 0
        while rest[i:].strip():
            f = re.compile(r"\s*(\w+)\s*=\s*").match(rest, i)
            if not f:
                raise ValueError(f"cannot read the field at {rest[i:i + 40]!r}")
            i = f.end()
            if rest[i] == "{":
                value, i = _braced(rest, i)
            elif rest[i] == '"':
                end = rest.index('"', i + 1)
                value, i = rest[i + 1:end], end + 1
            else:
                n = re.compile(r"\d+").match(rest, i)
                if not n:
                    raise ValueError(f"field {f.group(1)} has no value")
                value, i = n.group(), n.end()
            fields[f.group(1).lower()] = value
            i = re.compile(r"\s*,?").match(rest, i).end()
        entries.append((m.group(1).lower(), key.strip(), fields))
    if text[pos:].strip():
        raise ValueError(f"text outside an entry: {text[pos:].strip()[:40]!r}")
    return entries


def _braced(text: str, start: int) -> tuple[str, int]:
    """The text inside the braces opening at `start`, and the index after the closing one."""
    depth = 0
    for i in range(start, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[start + 1:i], i + 1
    raise ValueError("unbalanced braces")


def test_parse_bibtex_reads_entries_and_refuses_broken_ones():
    two = '@article{a, title = {T {X}}, year = 2020}\n@book{b, author = "A, B"}'
    assert parse_bibtex(two) == [("article", "a", {"title": "T {X}", "year": "2020"}),
                                 ("book", "b", {"author": "A, B"})]
    for broken in ("@article{a, title = {T}", "@article{a, title = {T}} stray", "@article{title = {T}}"):
        try:
            parse_bibtex(broken)
        except ValueError:
            continue
        raise AssertionError(f"parsed {broken!r}")


def test_readme_bibtex_is_one_inproceedings_entry():
    blocks = re.findall(r"^```bibtex\n(.*?)^```", README.read_text(encoding="utf-8"), flags=re.MULTILINE | re.DOTALL)
    assert len(blocks) == 1
    entries = parse_bibtex(blocks[0])
    assert len(entries) == 1
    kind, _, fields = entries[0]
    assert kind == "inproceedings"
    assert {"title", "author", "booktitle", "year"} <= set(fields)
    assert re.fullmatch(r"\d{4}", fields["year"])
    assert all(re.fullmatch(r"[^,]+, [^,]+", a.strip()) for a in fields["author"].split(" and "))
    assert "SemEval" in fields["booktitle"] and "Codec" in fields["title"]
