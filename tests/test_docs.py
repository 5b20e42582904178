"""The documentation against the code: every command's synopsis in docs/reference.md lists exactly the options its
``--help`` shows (with the defaults and choices it names), the exit codes match ``driftmerge --help``, and the
README's and docs' relative links resolve."""

from __future__ import annotations

import re
from pathlib import Path

import click
import pytest
from click.testing import CliRunner
from driftmerge_cli.main import cli as driftmerge_cli

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT / "docs" / "reference.md"
HELP = {"-h", "--help"}  # click's own, on every command; the synopses may leave it out
OPTION = re.compile(r"(?<![\w-])(--?[A-Za-z][\w-]*)")


def commands() -> dict[str, click.Command]:
    """``""`` for the group itself, then every sub-command by name."""
    return {"": driftmerge_cli, **driftmerge_cli.commands}


def help_text(name: str) -> str:
    result = CliRunner().invoke(driftmerge_cli, [*name.split(), "--help"], terminal_width=200)
    assert result.exit_code == 0, result.output
    return result.output


def synopses() -> dict[str, list[str]]:
    """The synopsis lines of each ``### `driftmerge X``` section (its first fenced block), by command name."""
    text = REFERENCE.read_text()
    out: dict[str, list[str]] = {}
    for match in re.finditer(r"^### `driftmerge( [\w-]+)?`\n(.*?)(?=^##)", text, re.S | re.M):
        name = (match.group(1) or "").strip()
        block = re.search(r"```\n(.*?)```", match.group(2), re.S)
        assert block, f"docs/reference.md: the section of `driftmerge {name}` has no synopsis block"
        lines = block.group(1).splitlines()
        assert lines and all(
            line.startswith(f"driftmerge {name}".rstrip()) or line.startswith(" ") for line in lines
        ), f"docs/reference.md: the synopsis of `driftmerge {name}` has a line of another command"
        out[name] = lines
    return out


def visible_options(cmd: click.Command) -> list[click.Option]:
    return [p for p in cmd.params if isinstance(p, click.Option) and not p.hidden]


def test_every_command_has_a_synopsis():
    assert set(synopses()) == set(commands())


@pytest.mark.parametrize("name", sorted(commands()))
def test_synopsis_lists_exactly_the_options_of_help(name):
    cmd, lines = commands()[name], synopses()[name]
    shown = help_text(name)
    written = set(OPTION.findall(" ".join(lines))) - HELP
    known: set[str] = set()
    for option in visible_options(cmd):
        assert any(opt in shown for opt in option.opts), (name, option.opts)  # what --help lists
        assert written & set(option.opts), f"docs/reference.md: `driftmerge {name}` lacks {'/'.join(option.opts)}"
        known |= {*option.opts, *option.secondary_opts}
    assert not written - known, f"docs/reference.md: `driftmerge {name}` lists options it has not: {written - known}"


@pytest.mark.parametrize("name", sorted(commands()))
def test_synopsis_defaults_and_choices_match(name):
    """``[--opt 0.5]`` must be the option's default, ``[--opt a|b]`` exactly its choices."""
    text = " ".join(synopses()[name])
    for option in visible_options(commands()[name]):
        for opt in option.opts:
            for value in re.findall(rf"\[{re.escape(opt)} ([^\s\]\[]+)", text):
                if isinstance(option.type, click.Choice):
                    assert set(value.split("|")) == set(option.type.choices), (name, opt, value)
                elif re.fullmatch(r"-?\d+(\.\d+)?", value) and isinstance(option.default, (int, float, str)):
                    default = option.default
                    assert float(value) == float(default), f"`driftmerge {name}`: {opt} defaults to {default}"


def exit_codes_of_help() -> set[int]:
    epilog = " ".join(help_text("").split("Exit codes:", 1)[1].split())
    return {int(code) for code in re.findall(r"(?:^|, )(\d+) [a-z]", epilog)}


def exit_code_table(path: Path) -> set[int]:
    return {int(code) for code in re.findall(r"^\| (\d+) \|", path.read_text(), re.M)}


def test_exit_codes_match_help():
    listed = exit_codes_of_help()
    assert 130 in listed and 0 in listed
    assert exit_code_table(REFERENCE) == listed
    assert exit_code_table(ROOT / "README.md") == listed


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@pytest.mark.parametrize("doc", ["README.md", "docs/reference.md", "docs/serving.md"])
def test_relative_links_resolve(doc):
    path = ROOT / doc
    text = path.read_text()
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        linked = (path.parent / file).resolve() if file else path
        assert linked.exists(), f"{doc}: the link {target} leads nowhere"
        if anchor and linked.suffix == ".md":
            headings = re.findall(r"^#+ (.+)$", linked.read_text(), re.M)
            assert anchor in {slug(h) for h in headings}, f"{doc}: no heading for #{anchor} in {linked.name}"


def test_readme_names_the_reference_docs():
    readme = (ROOT / "README.md").read_text()
    for doc in ("reference.md", "serving.md", "design.md", "reground.md", "sweep.md", "validation.md"):
        assert f"(docs/{doc})" in readme, f"README does not link docs/{doc}"
