"""The project's own documents: docs/theory.md and docs/performance.md exist, nothing cites the
documents they replaced (THEORY.md, PERFORMANCE.md, which are not in the repository), every
section of docs/theory.md that a file cites exists, and docs/theory.md names every public
function of ``wdopt.theory``. Reads text files only: no torch work."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
THEORY = ROOT / "docs" / "theory.md"
PERFORMANCE = ROOT / "docs" / "performance.md"
TEXT_SUFFIXES = {".py", ".md", ".cpp", ".h", ".cu", ".cuh", ".sh", ".txt", ".toml", ".cfg", ".rst", ".yml", ".yaml"}
# "THEORY.md" or "PERFORMANCE.md" as a file name of its own (not the tail of docs/theory.md, which
# differs in case anyway): the old documents outside the repository.
OLD_DOCUMENT = re.compile(r"(?<![\w/.-])(?:docs/)?(THEORY|PERFORMANCE)\.md\b")
# "docs/theory.md section 3", "docs/theory.md sections 2 and 4", "docs/theory.md §2.2", "sections 2–4".
CITATION = re.compile(r"docs/theory\.md\)?,?\s+(?:sections?|§)\s*(\d+(?:\.\d+)*)"
                      r"(?:\s*(?:and|,|–|-)\s*(\d+(?:\.\d+)*))?")
HEADING = re.compile(r"^#{2,4}\s+(\d+(?:\.\d+)*)\.?\s", re.MULTILINE)


def repository_files() -> list[Path]:
    """The text files of the working tree that git knows or would add (tracked and untracked, not
    ignored); without git, every text file under the root outside hidden and build folders."""
    try:
        out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=ROOT,
                             capture_output=True, check=True, text=True).stdout
        names = [ROOT / n for n in out.split("\0") if n]
    except (OSError, subprocess.CalledProcessError):
        names = [p for p in ROOT.rglob("*") if not any(part.startswith(".") or part in {"build", "dist"}
                                                        or part.endswith(".egg-info") for part in p.relative_to(ROOT).parts)]
    return [p for p in names if p.suffix in TEXT_SUFFIXES and p.is_file()]


def _citations(text: str) -> list[str]:
    """Section numbers cited from docs/theory.md; a range "2–4" cites every section in it."""
    cited = []
    for match in CITATION.finditer(text):
        first, second = match.group(1), match.group(2)
        cited.append(first)
        if second:
            if "–" in match.group(0) or re.search(r"\d-\d", match.group(0)):
                if first.isdigit() and second.isdigit():
                    cited += [str(i) for i in range(int(first) + 1, int(second) + 1)]
                    continue
            cited.append(second)
    return cited


def theory_sections() -> set[str]:
    return set(HEADING.findall(THEORY.read_text(encoding="utf-8")))


def test_the_documents_exist():
    assert THEORY.is_file() and PERFORMANCE.is_file()
    assert {"1", "2", "3", "5"} <= theory_sections()


def test_nothing_cites_the_documents_outside_the_repository():
    offenders = []
    for path in repository_files():
        if path == Path(__file__).resolve():
            continue
        for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            if OLD_DOCUMENT.search(line):
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not offenders, "cite docs/theory.md or docs/performance.md instead:\n" + "\n".join(offenders)


def test_every_cited_section_of_the_theory_exists():
    sections = theory_sections()
    missing, seen = [], 0
    for path in repository_files():
        # A citation may wrap onto the next line of a comment: join lines, dropping comment markers.
        text = path.read_text(encoding="utf-8", errors="replace")
        text = re.sub(r"\n\s*(?://|#|\*)?\s*", " ", text)
        for section in _citations(text):
            seen += 1
            if section not in sections:
                missing.append(f"{path.relative_to(ROOT)}: section {section}")
    assert seen > 0, "no citation of docs/theory.md found: is the pattern still right?"
    assert not missing, f"docs/theory.md has sections {sorted(sections)}; cited but absent:\n" + "\n".join(missing)


@pytest.mark.parametrize("text, expected", [
    ("(docs/theory.md section 3.3)", ["3.3"]),
    ("docs/theory.md sections 2 and 4;", ["2", "4"]),
    ("[docs/theory.md](docs/theory.md), sections 2–4)", ["2", "3", "4"]),
    ("docs/theory.md §2.2", ["2.2"]),
])
def test_citation_pattern(text, expected):
    assert _citations(text) == expected


def test_the_theory_names_every_public_function_of_wdopt_theory():
    # The names are read from wdopt/theory.py's source (its __all__ and top-level defs): importing
    # it would import torch, which this cheap test does not need.
    source = (ROOT / "wdopt" / "theory.py").read_text(encoding="utf-8")
    all_names = re.search(r"__all__\s*=\s*\[(.*?)\]", source, re.DOTALL)
    public = set(re.findall(r"\"(\w+)\"", all_names.group(1))) if all_names else set()
    public |= {name for name in re.findall(r"^(?:def|class)\s+(\w+)", source, re.MULTILINE) if not name.startswith("_")}
    assert public, "found no public names in wdopt/theory.py"
    theory = THEORY.read_text(encoding="utf-8")
    absent = sorted(name for name in public if not re.search(rf"\b{name}\b", theory))
    assert not absent, f"docs/theory.md does not mention wdopt.theory's {absent}"
