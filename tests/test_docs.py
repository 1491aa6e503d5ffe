"""Every "docs/PAD.md section N" the code and docs cite exists, and nothing cites a file outside the repository."""
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CITE = re.compile(r"(?:docs/)?PAD\.md,? sections? (\d+)(?:\s*-\s*(\d+))?")


def cited_files():
    for folder in ("padnet_ds", "bench", "configs", "docs", "launch", "tests"):
        yield from (p for p in (REPO / folder).rglob("*") if p.suffix in (".py", ".md", ".yaml", ".sh"))
    yield REPO / "README.md"


def test_pad_md_sections_cited_exist():
    sections = {int(n) for n in re.findall(r"^## (\d+)\.", (REPO / "docs" / "PAD.md").read_text(), re.M)}
    cited = {}
    for path in cited_files():
        for m in CITE.finditer(path.read_text()):
            first, last = int(m.group(1)), int(m.group(2) or m.group(1))
            for n in range(first, last + 1):
                cited.setdefault(n, path.relative_to(REPO).as_posix())
    assert cited, "nothing cites docs/PAD.md: the pattern is wrong"
    missing = {n: where for n, where in cited.items() if n not in sections}
    assert not missing, f"docs/PAD.md has no section {sorted(missing)} (cited in {sorted(set(missing.values()))})"


def test_no_citation_of_the_unshipped_spec():
    hits = [p.relative_to(REPO).as_posix() for p in cited_files() if p != Path(__file__)
            and re.search(r"PAD_SPEC|DEEPSPEED_CPU\.md", p.read_text())]
    assert not hits, f"cite docs/PAD.md instead of files outside the repository: {hits}"
