"""The README and docs/ stay true to the repository: links and file paths exist, the method brief
is referred to by its place in the repository (docs/method.md), the README stays short, and every
decimal number it quotes is one the committed results hold."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, *DOCS]

README_MAX_LINES = 210

# Decimal numbers the README may quote although no results file holds them: versions only.
NUMBER_ALLOWLIST = {
    "3.10": "the oldest Python pyproject.toml accepts",
    "3.11": "the Python CI runs",
}

# Folders whose paths the pages name; a path-like reference starting with one of them must exist.
PATH_ROOTS = ("pemae", "tests", "notebooks", "results", "study", "docs", ".ci")
# a path, and the character after it: "<", "*", "{" or "$" make it a pattern (`seed<seed>/`)
PATH_RE = re.compile(r"(?<![\w./-])((?:%s)/[\w./-]*)(.?)" % "|".join(re.escape(r) for r in PATH_ROOTS))
LINK_RE = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
URL_RE = re.compile(r"[a-z][a-z0-9+.-]*://\S+", re.I)
FENCE_RE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)
NUMBER_RE = re.compile(r"\d+\.\d+")
OLD_BRIEF = "METHOD" + ".md"  # spelt in two halves, so that this file does not name it


def _repo_files() -> list[Path]:
    """Every file of the repository: git's tracked and untracked-but-not-ignored files, or, without
    git, a walk that skips .git, .venv, build outputs and caches."""
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                             cwd=ROOT, capture_output=True, check=True).stdout
        return [ROOT / p for p in out.decode().split("\0") if p and (ROOT / p).is_file()]
    except (OSError, subprocess.CalledProcessError):
        skip = {".git", ".venv", "__pycache__", ".pytest_cache", ".ipynb_checkpoints", "build"}
        return [p for p in ROOT.rglob("*") if p.is_file()
                and not any(part in skip or part.endswith(".egg-info") for part in p.relative_to(ROOT).parts)]


def _dvc_outputs() -> set[str]:
    """Paths DVC records as stage outputs (checkpoints, encoders, executed notebooks): they live in
    the DVC cache, not in git, so a fresh clone does not have them until `dvc pull`."""
    paths = set()
    for lock in (ROOT / "dvc.lock", ROOT / "study" / "dvc.lock"):
        if lock.is_file():
            paths.update(re.findall(r"^\s*-?\s*path:\s*(\S+)\s*$", lock.read_text(), re.M))
    return paths


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    text = FENCE_RE.sub("", page.read_text())
    return {_slug(m) for m in re.findall(r"^#{1,6}\s+(.+?)\s*#*\s*$", text, re.M)}


def _exists(path: str) -> bool:
    path = path.rstrip(".,;:")
    return (ROOT / path).exists() or path.rstrip("/") in _dvc_outputs()


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_point_at_files_and_headings_that_exist(page):
    broken = []
    for target in LINK_RE.findall(page.read_text()):
        if URL_RE.match(target) or target.startswith("mailto:"):
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(f"{target}: no heading with anchor #{anchor} in {dest.relative_to(ROOT)}")
    assert not broken, f"{page.relative_to(ROOT)}: broken links:\n" + "\n".join(broken)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_repository_paths_named_in_the_page_exist(page):
    text = URL_RE.sub("", page.read_text())
    paths = {path if after not in "<*{$" or not after else path[:path.rfind("/") + 1]
             for path, after in PATH_RE.findall(text)}
    missing = sorted(p for p in paths if not _exists(p))
    assert not missing, f"{page.relative_to(ROOT)} names paths that do not exist: {missing}"


def test_the_method_brief_is_referred_to_as_docs_method_md():
    assert (ROOT / "docs" / "method.md").is_file()
    offenders = []
    for path in _repo_files():
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue  # binary files (figures, checkpoints)
        for number, line in enumerate(text.splitlines(), 1):
            if OLD_BRIEF in line:
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()[:100]}")
    assert not offenders, "the method brief is docs/method.md now:\n" + "\n".join(offenders)


def test_readme_is_short():
    lines = len(README.read_text().splitlines())
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines (at most {README_MAX_LINES}): " \
                                      "move detail to docs/"


def test_readme_quotes_only_numbers_the_results_hold():
    """A decimal number in the README's prose (code blocks are commands, not quotes) must appear,
    verbatim, in a committed results table or JSON file: numbers are copied, never typed."""
    held = "\n".join(p.read_text(errors="replace")
                     for p in sorted((ROOT / "results").rglob("*")) if p.suffix in (".md", ".json"))
    prose = URL_RE.sub("", FENCE_RE.sub("", README.read_text()))
    unheld = sorted({n for n in NUMBER_RE.findall(prose) if n not in NUMBER_ALLOWLIST and n not in held})
    assert not unheld, f"README.md quotes numbers no file under results/ holds: {unheld}"


def test_the_docs_pages_the_readme_promises_exist():
    for name in ("method", "protocol", "studies", "speed", "gpu", "sharing", "troubleshooting"):
        page = ROOT / "docs" / f"{name}.md"
        assert page.is_file(), f"docs/{name}.md is missing"
        assert f"docs/{name}.md" in README.read_text(), f"README.md does not link docs/{name}.md"
    assert "Memory per micro-batch" in (ROOT / "docs" / "gpu.md").read_text()


def test_readme_states_the_claims_exactly_as_the_table_does():
    """The README's claims block is generated from results/claims.json (`python -m pemae.results
    --readme`): a README that words a comparison more strongly than the table fails here."""
    from pemae.report.claims import readme_claims

    assert readme_claims(ROOT / "results" / "claims.json") in README.read_text(), (
        "README.md's claims block differs from results/claims.json: run python -m pemae.results --readme")


@pytest.mark.parametrize("page", [README, *DOCS], ids=lambda p: p.name)
def test_no_page_calls_a_claim_decided_that_the_table_does_not(page):
    """Outside the generated block too: a line that names a claim of params.yaml and a verdict
    word uses the table's verdict for that claim (and "does not hold", the old rule's words, never)."""
    from pemae.report.claims import decided_comparisons

    verdicts = {(claim, verdict) for (claim, _), verdict in decided_comparisons(ROOT / "results" / "claims.json").items()}
    claims = yaml.safe_load((ROOT / "params.yaml").read_text())["claims"]
    for line in page.read_text().splitlines():
        assert "does not hold" not in line, line
        for claim in (c for c in claims if c in line):
            for word in ("holds", "reversed"):
                if re.search(rf"\*?\b{word}\b", line) and not line.lstrip().startswith("<!--"):
                    assert (claim, word) in verdicts, (page.name, claim, word, line)
