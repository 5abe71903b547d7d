"""README.md and docs/*.md stay true to the repo: every relative link (and #heading) resolves, and every `python`,
`bash` or `torchrun` command names a script that exists and only flags that the code defines."""

import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
CODE_DIRS = ["model", "dataset", "trainer", "scripts", "hands-on"]

CODE_BLOCK = re.compile(r"^```[^\n]*\n(.*?)^```", re.S | re.M)
INLINE_CODE = re.compile(r"`([^`]+)`")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*$", re.M)
SEPARATORS = {"|", "||", "&&", ";", "<", ">", "2>&1"}


def defined_flags() -> set[str]:
    """Every '--flag' string literal in the repo's code: what argparse can possibly accept."""
    sources = [ROOT / "eval_llm.py", *(p for d in CODE_DIRS for p in (ROOT / d).rglob("*.py"))]
    return {flag for path in sources for flag in re.findall(r"""["'](--[\w-]+)["']""", path.read_text("utf-8"))}


def heading_anchors(markdown: str) -> set[str]:
    """GitHub's anchors for a file's headings: lower case, punctuation dropped, spaces to '-', repeats numbered."""
    anchors, seen = set(), {}
    for title in HEADING.findall(CODE_BLOCK.sub("", markdown)):
        slug = re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-")
        anchors.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
        seen[slug] = seen.get(slug, 0) + 1
    return anchors


def broken_links(doc: Path) -> list[str]:
    text = doc.read_text("utf-8")
    problems = []
    for target in LINK.findall(CODE_BLOCK.sub("", text)):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        file = (doc.parent / path).resolve() if path else doc
        if not file.exists():
            problems.append(f"{doc.name}: link to a missing file: {target}")
        elif anchor and file.suffix == ".md" and anchor not in heading_anchors(file.read_text("utf-8")):
            problems.append(f"{doc.name}: link to a missing heading: {target}")
    return problems


def commands(markdown: str) -> list[list[str]]:
    """The shell lines of code blocks and inline code, as tokens (comments dropped, continuations joined)."""
    blocks = CODE_BLOCK.findall(markdown)
    lines = [line for block in blocks for line in block.replace("\\\n", " ").splitlines()]
    lines += [span.replace("\n", " ") for span in INLINE_CODE.findall(CODE_BLOCK.sub("", markdown))]
    tokens = []
    for line in lines:
        try:
            tokens.append(shlex.split(line, comments=True))
        except ValueError:  # an unbalanced quote: not a command
            continue
    return tokens


def bad_commands(markdown: str, flags: set[str]) -> list[str]:
    problems = []
    for tokens in commands(markdown):
        for i, word in enumerate(tokens):
            rest = tokens[i + 1:]
            if word not in ("python", "python3", "bash", "torchrun") or not rest:
                continue
            if word == "torchrun":
                scripts = [j for j, t in enumerate(rest) if t.endswith(".py")]
                if not scripts:
                    problems.append(f"torchrun without a script: {' '.join(tokens)}")
                    continue
                rest = rest[scripts[0]:]
            elif rest[0] == "-m":
                paths = [t for t in rest[2:] if not t.startswith("-") and t not in SEPARATORS]
                problems += [f"missing file: {t} in: {' '.join(tokens)}" for t in paths if not (ROOT / t).exists()]
                continue
            script, args = rest[0], rest[1:]
            if (word != "bash" and not script.endswith(".py")) or not (ROOT / script).is_file():
                problems.append(f"missing script: {script} in: {' '.join(tokens)}")
            for arg in args:
                if arg in SEPARATORS:
                    break
                if arg.startswith("--") and arg.split("=")[0] not in flags:
                    problems.append(f"unknown flag: {arg} in: {' '.join(tokens)}")
    return problems


@pytest.mark.parametrize("doc", DOC_FILES, ids=lambda p: p.name)
def test_relative_links_resolve(doc):
    assert broken_links(doc) == []


@pytest.mark.parametrize("doc", DOC_FILES, ids=lambda p: p.name)
def test_commands_name_existing_scripts_and_flags(doc):
    assert bad_commands(doc.read_text("utf-8"), defined_flags()) == []


def test_docs_folder_is_checked():
    """The parametrised tests above check something: the README and the docs files are all found."""
    assert {p.name for p in DOC_FILES} >= {"README.md", "training.md", "layout.md"}


def test_checks_catch_broken_links_and_commands(tmp_path):
    (tmp_path / "there.md").write_text("# A heading: here\n")
    doc = tmp_path / "doc.md"
    doc.write_text("[ok](there.md#a-heading-here) [gone](missing.md) [no heading](there.md#nowhere) "
                   "[web](https://example.com/x.md)\n```\n[in code](ignored.md)\n```\n")
    assert broken_links(doc) == ["doc.md: link to a missing file: missing.md",
                                 "doc.md: link to a missing heading: there.md#nowhere"]

    markdown = ("```bash\n"
                "python trainer/train_pretrain.py --max_steps 5   # fine\n"
                "python trainer/train_nothing.py\n"
                "printf 'hi\\n' | python eval_llm.py --temperature 0 --no_such_flag\n"
                "torchrun --nproc_per_node 2 trainer/train_gone.py\n"
                "bash scripts/speedrun.sh --max_steps 1 \\\n    --bogus\n"
                "python -m pytest tests/test_gone.py\n"
                "```\n"
                "Inline: `python scripts/none.py` and `bash .ci/run`.\n")
    assert bad_commands(markdown, defined_flags()) == [
        "missing script: trainer/train_nothing.py in: python trainer/train_nothing.py",
        "unknown flag: --no_such_flag in: printf hi\\n | python eval_llm.py --temperature 0 --no_such_flag",
        "missing script: trainer/train_gone.py in: torchrun --nproc_per_node 2 trainer/train_gone.py",
        "unknown flag: --bogus in: bash scripts/speedrun.sh --max_steps 1 --bogus",
        "missing file: tests/test_gone.py in: python -m pytest tests/test_gone.py",
        "missing script: scripts/none.py in: python scripts/none.py",
    ]
