"""The README is a front page and the docs hold the rest: the README stays short and starts
with the two commands, every relative link and anchor in README.md and docs/*.md points at
something that exists, and every decimal number in the README's tables is backed by a page
in docs/ or a file in benchmarks/results/. Files are only read."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
FIRST_BLOCK = """\
bash dev.sh demo     # set up .venv, compress the bundled SmolLM2-135M three ways, compare
bash dev.sh test     # set up .venv, run lint and the test suite (what CI runs)"""

FENCE = re.compile(r"^(`{3,}|~{3,})")
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$")
DECIMAL = r"(?<![\d.]){}(?!\d)"


def with_fences(text: str):
    """Each line, and whether it belongs to a fenced code block (its fences included)."""
    fence = None
    for line in text.splitlines():
        opened = FENCE.match(line.lstrip())
        if fence is None and opened:
            fence = opened.group(1)[0] * 3
            yield line, True
        elif fence is not None:
            if line.lstrip().startswith(fence):
                fence = None
            yield line, True
        else:
            yield line, False


def prose(text: str, inline_code: bool = False) -> str:
    """The text outside fenced code blocks, and without inline code unless asked: where
    links and headings live."""
    text = "\n".join(line for line, fenced in with_fences(text) if not fenced)
    return text if inline_code else re.sub(r"`[^`]*`", "", text)


def code_blocks(text: str) -> list[str]:
    blocks, current = [], None
    for line in text.splitlines():
        if FENCE.match(line.lstrip()):
            if current is None:
                current = []
            else:
                blocks.append("\n".join(current))
                current = None
        elif current is not None:
            current.append(line)
    return blocks


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lowercase, markup and punctuation dropped (hyphens,
    underscores and spaces kept), spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link keeps its text
    text = "".join(c for c in text.lower() if c.isalnum() or c in "-_ ")
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """Every heading's anchor, numbered as GitHub numbers repeats (`-1`, `-2`, ...)."""
    seen: dict[str, int] = {}
    out = set()
    for line in prose(page.read_text(), inline_code=True).splitlines():
        match = HEADING.match(line)
        if match:
            base = slug(match.group(1).replace("`", ""))
            count = seen.get(base, 0)
            seen[base] = count + 1
            out.add(base if count == 0 else f"{base}-{count}")
    return out


def test_readme_is_a_front_page():
    lines = README.read_text().splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines; move detail to docs/"


def test_readme_starts_with_the_two_commands():
    blocks = code_blocks(README.read_text())
    assert blocks, "README.md has no code block"
    assert blocks[0] == FIRST_BLOCK, f"README.md's first code block is\n{blocks[0]}"


def test_links_and_anchors_resolve():
    assert (ROOT / "docs").is_dir() and len(PAGES) > 1, "docs/*.md are missing"
    broken = []
    for page in PAGES:
        for target in LINK.findall(prose(page.read_text())):
            if re.match(r"(https?:|mailto:)", target):
                continue
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            where = f"{page.relative_to(ROOT)}: ({target})"
            if not dest.exists():
                broken.append(f"{where}: no such file")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                broken.append(f"{where}: no heading with anchor #{anchor} in {dest.name}")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_slug_follows_github():
    assert slug("Block refinement, healing, and the SVD-LLM code's third pipeline") == (
        "block-refinement-healing-and-the-svd-llm-codes-third-pipeline"
    )
    assert slug("Quality (protocol P1)") == "quality-protocol-p1"
    assert slug("Choosing svdllm-a's λ") == "choosing-svdllm-as-λ"


def blocks(text: str) -> list[str]:
    """Paragraphs, tables, list items run together and fenced code blocks: the text
    between blank lines outside fences."""
    out, current = [], []
    for line, fenced in with_fences(text):
        if line.strip() or fenced:
            current.append(line)
        elif current:
            out.append("\n".join(current))
            current = []
    return out + ["\n".join(current)] * bool(current)


def unbacked_numbers(page: Path) -> list[tuple[str, list[str]]]:
    """(number, the files cited beside it) for each decimal number in `page` that none of
    those files holds. A block (blocks()) is backed by the files linked in it and in the
    blocks just before and after it: where a table's or a paragraph's source is named.
    Not looked up: an option's value in a command (`--ratio 0.2`, a setting) and a
    multiplier (`2.5×`, a ratio of two cited numbers)."""
    parts = blocks(page.read_text())
    missing = []
    for i, block in enumerate(parts):
        text = re.sub(r"\]\([^)]*\)", "]", block)  # link targets are not results
        text = re.sub(r"--[\w-]+[ =]\S+|Python ≥ 3\.10", "", text)
        numbers = set(re.findall(r"(?<![\d.])\d+\.\d+(?![\d×])", text))
        if not numbers:
            continue
        beside = "\n".join(parts[max(0, i - 1) : i + 2])
        targets = [t.partition("#")[0] for t in LINK.findall(beside)]
        cited = sorted({(page.parent / t).resolve() for t in targets
                        if t and not re.match(r"(https?:|mailto:)", t)})  # fmt: skip
        backing = "\n".join(f.read_text(errors="replace") for f in cited if f.is_file())
        names = [f.name for f in cited]
        missing += [(n, names) for n in sorted(numbers)
                    if not re.search(DECIMAL.format(re.escape(n)), backing)]  # fmt: skip
    return missing


def test_readme_numbers_are_backed_by_the_files_they_cite():
    """Every decimal number on the front page (tables, prose, the demo's output) is one the
    results file or docs page cited beside it carries: not merely one found somewhere."""
    assert re.search(r"\d+\.\d+", README.read_text()), "README.md holds no decimal number"
    unbacked = unbacked_numbers(README)
    assert not unbacked, "numbers in README.md that the files cited beside them do not hold:\n" + (
        "\n".join(f"{n} (cited: {', '.join(files) or 'nothing'})" for n, files in unbacked)
    )


def test_the_number_check_finds_a_wrong_or_uncited_number(tmp_path):
    """The check on a made-up page: a number its cited file holds passes; one mistyped,
    one that only an uncited file holds, and one with no citation beside it do not."""
    (tmp_path / "cited.md").write_text("| run | perplexity |\n|---|---|\n| a | 41.30 |\n")
    (tmp_path / "other.md").write_text("an unrelated result: 17.25\n")
    page = tmp_path / "page.md"
    page.write_text(
        "Refined, it scored 41.30 ([cited.md](cited.md#run)), 2.2× the original's;\n"
        "`compress --ratio 0.2` ran it.\n\n"
        "| model | perplexity |\n|---|---|\n| refined | 41.30 |\n\n"
        "From [cited.md](cited.md): 41.31, and 17.25.\n\n"
        "A paragraph between.\n\n"
        "Far from any citation: 41.30.\n"
    )
    assert unbacked_numbers(page) == [("17.25", ["cited.md"]), ("41.31", ["cited.md"]),
                                      ("41.30", [])]  # fmt: skip


def test_cited_scripts_exist_or_name_the_commit_that_held_them():
    """A `benchmarks/X.py` cited in the docs or a results file is in the tree, or was removed
    once its decision was taken and the same paragraph names a commit that holds it
    (`git show <sha>:benchmarks/X.py`): so every result still says what produced it."""

    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)

    shallow = git("rev-parse", "--is-shallow-repository")
    if shallow.returncode != 0 or shallow.stdout.strip() != "false":
        pytest.skip("needs the repository's full git history (not a shallow clone)")
    pages = [*PAGES, *sorted((ROOT / "benchmarks/results").glob("*.md"))]
    unexplained = []
    for page in pages:
        for block in blocks(page.read_text()):
            for script in sorted(set(re.findall(r"benchmarks/(\w+\.py)", block))):
                if (ROOT / "benchmarks" / script).is_file():
                    continue
                shas = re.findall(rf"git show ([0-9a-f]{{7,40}}):benchmarks/{script}", block)
                held = [s for s in shas if git("cat-file", "-e", f"{s}:benchmarks/{script}")
                        .returncode == 0]  # fmt: skip
                if not held:
                    unexplained.append(f"{page.relative_to(ROOT)}: benchmarks/{script}")
    assert not unexplained, "scripts cited but neither in the tree nor at a named commit:\n" + (
        "\n".join(unexplained)
    )
