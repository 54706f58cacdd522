"""The manual stays true: the options page is generated and current, and every `alignkit ...` command
line in README.md and docs/ names a real stage and real options (parsed with the CLI's own parser,
without running anything), every recipe a page names (`recipes/<name>.yaml`, in a command, a link
or prose) exists and loads, and every relative Markdown link (and its #anchor) points to an existing
file (and heading)."""

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from alignkit import config as C
from alignkit.cli import STAGES, build_parser

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
GLOBAL_FLAGS = {"--debug", "--help", "-h"}


def test_options_page_is_current():
    res = subprocess.run([sys.executable, str(ROOT / "tools" / "gen_options.py"), "--check"],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def command_lines(text: str) -> list[str]:
    """`alignkit ...` commands: lines of fenced code blocks (continuations joined, comments cut), and
    inline code spans that start with `alignkit `."""
    found = []
    for block in re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            for part in re.split(r"&&|;|\|", line.split(" #", 1)[0]):
                part = part.strip()
                if part.startswith("alignkit "):
                    found.append(part)
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    found += [m for m in re.findall(r"`(alignkit [^`]+)`", prose)]
    return found


def flags_of(name: str) -> set[str]:
    parser = build_parser(name, STAGES[name])
    return {s for action in parser._actions for s in action.option_strings} | GLOBAL_FLAGS


def check_command(line: str) -> list[str]:
    try:
        words = shlex.split(line)
    except ValueError as e:
        return [f"{line!r}: {e}"]
    if len(words) < 2 or words[1].startswith("<") or words[1] in ("-h", "--help", "--version"):
        return []  # `alignkit <stage> ...`: a pattern, not a command; or a top-level flag
    name = words[1]
    if name not in STAGES:
        return [f"{line!r}: no stage '{name}'"]
    known, problems = flags_of(name), []
    for i, word in enumerate(words[2:], 2):
        if word.startswith("--"):
            flag = word.split("=", 1)[0]
            if flag not in known:
                problems.append(f"{line!r}: alignkit {name} has no option {flag}")
            elif flag == "--config" and i + 1 < len(words) and not words[i + 1].isupper():
                recipe = ROOT / words[i + 1]
                if not recipe.exists():
                    problems.append(f"{line!r}: recipe {words[i + 1]} does not exist")
                else:
                    C.load(STAGES[name].config, recipe)
        elif i == 2 and STAGES[name].positional == "pipeline" and word.endswith((".yaml", ".yml")):
            if not (ROOT / word).exists() and word.startswith("recipes/"):
                problems.append(f"{line!r}: pipeline {word} does not exist")
    return problems


def test_every_documented_command_parses():
    problems, count = [], 0
    for page in PAGES:
        for line in command_lines(page.read_text()):
            count += 1
            problems += [f"{page.relative_to(ROOT)}: {p}" for p in check_command(line)]
    assert count > 20  # the extraction found the README's commands
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("line, problem", [
    ("alignkit sfx --config recipes/sft-qwen2.5-0.5b-smoltalk.yaml", "no stage 'sfx'"),
    ("alignkit sft --train.learnig-rate 1e-5", "no option --train.learnig-rate"),
    ("alignkit dpo --config recipes/dpo-missing.yaml", "does not exist"),
])
def test_the_checker_catches_a_stale_command(line, problem):
    assert any(problem in p for p in check_command(line))


RECIPE = re.compile(r"recipes/([\w.+-]+\.ya?ml)")


def recipe_problems(text: str) -> list[str]:
    """Each `recipes/<name>.yaml` the text names exists; a stage recipe loads with its stage's config
    (the stage from the name's first word, as tests/test_config.py reads it), a pipeline file reads."""
    from alignkit.pipeline import read_pipeline

    problems = []
    for name in sorted(set(RECIPE.findall(text))):
        path = ROOT / "recipes" / name
        if not path.exists():
            problems.append(f"recipes/{name} does not exist")
            continue
        stage = name.split("-", 1)[0]
        try:
            if stage == "pipeline" or "stages" in (yaml.safe_load(path.read_text()) or {}):  # a pipeline file
                read_pipeline(path)
            else:
                C.load(STAGES[{"rloo": "rl", "grpo": "rl", "self": "self-improve"}.get(stage, stage)].config, path)
        except (KeyError, C.ConfigError) as e:
            problems.append(f"recipes/{name} does not load: {e}")
    return problems


def test_every_named_recipe_exists_and_loads():
    problems, named = [], set()
    for page in PAGES:
        text = page.read_text()
        named |= set(RECIPE.findall(text))
        problems += [f"{page.relative_to(ROOT)}: {p}" for p in recipe_problems(text)]
    assert len(named) >= 5  # the extraction found the recipes the pages name
    assert not problems, "\n".join(problems)


LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation other than '-' and '_' dropped, spaces as '-'."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    return {slug(m) for m in re.findall(r"^#+\s+(.*)$", text, flags=re.M)}


def link_problems(page: Path, text: str) -> list[str]:
    """Relative links (and images) of a Markdown text on `page` whose file, or whose #anchor in a
    Markdown file, does not exist. Links in code blocks are not links; web links are not checked."""
    problems = []
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    for target in LINK.findall(prose):
        if re.match(r"[a-z]+:", target):
            continue  # https:, mailto:
        file, _, anchor = target.partition("#")
        path = (page.parent / file).resolve() if file else page
        if not path.exists():
            problems.append(f"link {target}: no file {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")
        elif anchor and path.suffix == ".md" and anchor not in anchors(path):
            problems.append(f"link {target}: no heading #{anchor} in {path.relative_to(ROOT)}")
    return problems


def test_every_relative_link_points_to_a_file():
    problems, count = [], 0
    for page in PAGES:
        text = page.read_text()
        count += len(LINK.findall(text))
        problems += [f"{page.relative_to(ROOT)}: {p}" for p in link_problems(page, text)]
    assert count > 20  # the extraction found the pages' links
    assert not problems, "\n".join(problems)


def test_the_checkers_catch_a_missing_recipe_file_and_heading():
    assert any("does not exist" in p for p in recipe_problems("see recipes/dpo-missing.yaml"))
    assert not recipe_problems("see recipes/sft-qwen2.5-0.5b-smoltalk.yaml")
    page = ROOT / "docs" / "README.md"
    assert any("no file" in p for p in link_problems(page, "[x](nowhere.md)"))
    assert any("no heading" in p for p in link_problems(page, "[x](sft.md#no-such-heading)"))
    assert any("no file" in p for p in link_problems(page, "![plot](docs/demo-best-of-n.png)"))
    assert not link_problems(page, "[x](sft.md) ![p](demo-best-of-n.png) [w](https://example.com/a)")
    assert not link_problems(page, "```\n[x](nowhere.md)\n```")


def test_the_front_page_demo_table_is_the_manuals():
    """The front page copies the demo's table from docs/demo.md: every row of it is there verbatim."""
    front, demo = (ROOT / "README.md").read_text(), (ROOT / "docs" / "demo.md").read_text()
    rows = [line for line in front.splitlines() if line.startswith("| ") and "%" in line]
    assert len(rows) >= 5
    assert [r for r in rows if r not in demo.splitlines()] == []


def test_the_set_up_commands_are_what_ci_runs():
    """.ci/run installs as the front page's "Set up" says and runs its test command."""
    front, ci = (ROOT / "README.md").read_text(), (ROOT / ".ci" / "run").read_text()
    assert 'pip install torch==2.13.0 -e ".[dev]"' in front and 'pip install -q torch==2.13.0 -e ".[dev]"' in ci
    assert "```bash\npython -m pytest -q\n```" in front and "\npython -m pytest -q\n" in ci
