"""The documentation holds together: its links resolve, the commands the README shows exist, the
README stays a guide, and no page speaks of the tracker or points outside the repository.

Pure file reads, plus `trainpipe COMMAND --help` once per command the README names."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
RESULTS = ROOT / "benchmarks" / "RESULTS.md"
README_MAX_LINES = 400


def pages() -> list[Path]:
    return [README, ROOT / "CONTRIBUTING.md", *sorted((ROOT / "docs").glob("*.md")), RESULTS]


FENCE = re.compile(r"^( {0,3})(`{3,}|~{3,})[^\n]*\n.*?^\1\2[`~]*[ \t]*$", re.M | re.S)
INLINE_CODE = re.compile(r"(`+)(.+?)\1", re.S)
# [text](target) and ![alt](target), target optionally in <>, optionally with a "title"
INLINE_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]*)>?(?:\s+[\"'(][^)]*)?\)")
REFERENCE_LINK = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$", re.M)
EXTERNAL = re.compile(r"^(?:[a-z][a-z0-9+.-]*:|//)", re.I)
HEADING = re.compile(r"^ {0,3}#{1,6}\s+(.*?)\s*#*\s*$", re.M)
TRACKER_WORDS = re.compile(r"\b(issue|issues|session|sessions)\b", re.I)
ISO_DATE = re.compile(r"\b20\d\d-[01]\d-[0-3]\d\b")
PARENT_PATH = re.compile(r"(?<![\w./-])((?:\.\./)+[\w./-]*)")
SHELL_COMMENT = re.compile(r"(^|[ \t])#.*$", re.M)
COMMAND = re.compile(r"(?<![\w.-])trainpipe[ \t]+([a-z][a-z0-9-]*)")


def without_code(text: str) -> str:
    """The text with fenced blocks and inline code spans blanked (links inside code are not links)."""
    text = FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), text)
    return INLINE_CODE.sub(lambda m: " " * len(m.group(0)), text)


def code_of(text: str) -> list[str]:
    """The contents of every fenced block (shell comments left out: prose, not commands) and every
    inline code span."""
    blocks = [SHELL_COMMENT.sub("", m.group(0)) for m in FENCE.finditer(text)]
    rest = FENCE.sub("\n", text)
    return blocks + [m.group(2) for m in INLINE_CODE.finditer(rest)]


def link_targets(text: str) -> list[str]:
    prose = without_code(text)
    return [m.group(1) for m in INLINE_LINK.finditer(prose)] + [
        m.group(1) for m in REFERENCE_LINK.finditer(prose)
    ]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, markup and punctuation dropped, spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link keeps its text
    text = re.sub(r"<[^>]+>", "", text).replace("`", "").lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    found = set()
    for heading in HEADING.findall(without_code(page.read_text(encoding="utf-8"))):
        base = slug(heading)
        n = seen.get(base, 0)
        seen[base] = n + 1
        found.add(base if n == 0 else f"{base}-{n}")
    return found


def broken_links(page: Path) -> list[str]:
    broken = []
    for target in link_targets(page.read_text(encoding="utf-8")):
        if not target or target.startswith("#") or EXTERNAL.match(target):
            continue  # empty, an anchor in this page, http(s), mailto
        path_part, _, anchor = target.partition("#")
        resolved = (page.parent / path_part).resolve()
        if not resolved.is_relative_to(ROOT):
            broken.append(f"{target}: leaves the repository")
        elif not resolved.exists():
            broken.append(f"{target}: no such file")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            broken.append(f"{target}: no heading with anchor #{anchor} in {resolved.relative_to(ROOT)}")
    return broken


def readme_commands() -> set[str]:
    return {
        m.group(1) for code in code_of(README.read_text(encoding="utf-8")) for m in COMMAND.finditer(code)
    }


def test_the_pages_exist():
    names = {p.relative_to(ROOT).as_posix() for p in pages()}
    for name in (
        "docs/architecture.md",
        "docs/data-gate.md",
        "docs/promotion-gate.md",
        "docs/serving.md",
        "docs/restart-and-caching.md",
        "docs/dvc-experiments.md",
        "docs/team-stack.md",
        "docs/training.md",
        "docs/cost-ledger.md",
        "docs/comparing.md",
    ):
        assert name in names, f"{name} is missing"
    for page in pages():
        assert page.is_file(), f"{page.relative_to(ROOT)} is missing"


@pytest.mark.parametrize("page", pages(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_resolve(page):
    assert broken_links(page) == []


def test_every_docs_page_is_linked_from_the_readme():
    linked = {(README.parent / t.partition("#")[0]).resolve() for t in link_targets(README.read_text())}
    unlinked = [p.name for p in sorted((ROOT / "docs").glob("*.md")) if p.resolve() not in linked]
    assert unlinked == []


def test_the_link_check_catches_a_broken_link(tmp_path, monkeypatch):
    page = tmp_path / "page.md"
    (tmp_path / "there.md").write_text("# A heading\n")
    page.write_text(
        "[ok](there.md) [ok](there.md#a-heading) [web](https://example.com) [top](#x)\n"
        "`[not a link](nowhere.md)`\n"
        "[gone](missing.md) [bad anchor](there.md#no-such-heading) [out](../../../../../../etc/passwd)\n"
    )
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    problems = broken_links(page)
    assert [p.split(":")[0] for p in problems] == [
        "missing.md",
        "there.md#no-such-heading",
        "../../../../../../etc/passwd",
    ]


def test_the_readme_names_commands():
    commands = readme_commands()
    # the everyday commands are what the README is for: if none were found, the check checks nothing
    assert {"run", "status", "serve", "restart"} <= commands


def test_every_command_in_the_readme_exists():
    commands = sorted(readme_commands())
    failed = []
    for command in commands:
        result = subprocess.run(
            [sys.executable, "-m", "pipelines.cli", command, "--help"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
        if result.returncode != 0:
            failed.append(f"trainpipe {command}: exit {result.returncode}: {result.stderr.strip()[-300:]}")
    assert failed == []


def test_an_unknown_command_fails_its_help():
    result = subprocess.run(
        [sys.executable, "-m", "pipelines.cli", "no-such-command", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0


def test_the_command_finder_reads_code_only():
    text = (
        "```sh\n.venv/bin/trainpipe status   # then trainpipe helps\ntrainpipe run -S a=1\n```\n"
        "Use `trainpipe compare 1 2` or `.venv/bin/trainpipe history`.\n"
        "In prose, trainpipe helps; the model trainpipe-code-completion is no command.\n"
    )
    found = {m.group(1) for code in code_of(text) for m in COMMAND.finditer(code)}
    assert found == {"status", "run", "compare", "history"}


def test_the_readme_is_a_guide_not_a_notebook():
    lines = README.read_text(encoding="utf-8").count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; move reference material to docs/"


@pytest.mark.parametrize("page", pages(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_no_tracker_talk(page):
    hits = [
        f"line {text[: m.start()].count(chr(10)) + 1}: {m.group(0)}"
        for text in [page.read_text(encoding="utf-8")]
        for m in TRACKER_WORDS.finditer(text)
    ]
    assert hits == []


@pytest.mark.parametrize("page", pages(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_no_path_leaves_the_repository(page):
    text = page.read_text(encoding="utf-8")
    leaving = [p for p in PARENT_PATH.findall(text) if not (page.parent / p).resolve().is_relative_to(ROOT)]
    assert leaving == []


@pytest.mark.parametrize(
    "page", [p for p in pages() if p != RESULTS], ids=lambda p: p.relative_to(ROOT).as_posix()
)
def test_dates_only_in_the_results_history(page):
    assert ISO_DATE.findall(page.read_text(encoding="utf-8")) == []


def test_dates_in_the_results_only_below_the_history():
    text = RESULTS.read_text(encoding="utf-8")
    assert "\n## History" in text
    assert ISO_DATE.findall(text.split("\n## History", 1)[0]) == []


def test_the_page_checks_catch_what_they_look_for():
    assert TRACKER_WORDS.search("as this Session found")
    assert not TRACKER_WORDS.search("a reissued token")
    assert ISO_DATE.search("measured on 2026-12-01")
    assert PARENT_PATH.findall("see ../shared/checks and ../infra/x.md") == [
        "../shared/checks",
        "../infra/x.md",
    ]
