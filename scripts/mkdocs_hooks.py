"""MkDocs hooks (mkdocs.yml): the CLI reference is rendered from ``cifar100.cli``'s own
parsers when the site is built, so no flag in the documentation is typed by hand."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

SOURCES = Path(__file__).resolve().parents[1] / "src"
MARKER = "<!-- cli-reference -->"
HELP_WIDTH = "100"  # argparse wraps to $COLUMNS: the same page on every terminal


def on_page_markdown(markdown: str, **kwargs) -> str:
    return markdown.replace(MARKER, cli_reference()) if MARKER in markdown else markdown


def cli_reference() -> str:
    """One section per command (and sub-command), each with its ``--help`` text."""
    sys.path.insert(0, str(SOURCES))  # this checkout's cifar100, whatever is installed
    from cifar100.cli import build_parser

    columns = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = HELP_WIDTH
    try:
        return "\n".join(_sections(build_parser(), level=2))
    finally:
        if columns is None:
            os.environ.pop("COLUMNS")
        else:
            os.environ["COLUMNS"] = columns


def _sections(parser: argparse.ArgumentParser, level: int) -> list[str]:
    title = "#" * level + f" `{parser.prog}`"
    sections = [f"{title}\n\n```text\n{parser.format_help().rstrip()}\n```\n"]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in dict.fromkeys(action.choices.values()):  # aliases name one parser
                sections += _sections(sub, level + 1 if level < 3 else level)
    return sections
