"""The flags several commands share (``recipes.shared_flags``): each is shared, and every
command its table names takes it, with the help the table gives it there."""

from __future__ import annotations

import argparse

import pytest

from cifar100.cli import build_parser
from cifar100.recipes.flags import flags_of
from cifar100.recipes.shared_flags import SHARED_FLAGS, SharedFlag, add_shared


def command_parsers() -> dict[str, argparse.ArgumentParser]:
    """command -> its parser; ``data`` is the parser of ``data info``, which takes the flags."""
    (commands,) = (a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    parsers = dict(commands.choices)
    (actions,) = (a for a in parsers["data"]._actions if isinstance(a, argparse._SubParsersAction))
    return {**parsers, "data": actions.choices["info"]}


def option(parser: argparse.ArgumentParser, flag: str) -> argparse.Action | None:
    return next((a for a in parser._actions if flag in a.option_strings), None)


@pytest.mark.parametrize("name", sorted(SHARED_FLAGS))
def test_a_shared_flag_is_in_every_command_that_its_table_names(name):
    shared, parsers = SHARED_FLAGS[name], command_parsers()
    assert len(shared.helps) >= 2, f"{shared.flag}: one command's flag belongs in its module"
    for command, text in shared.helps.items():
        action = option(parsers[command], shared.flag)
        assert action is not None, f"cifar100 {command} lacks {shared.flag}"
        assert (action.dest, action.help) == (name, text)


def test_no_command_takes_a_shared_flag_its_table_does_not_name():
    """A command that spells out a shared flag itself would drift from the others; train and
    tune take theirs from the table of training flags."""
    for command, parser in command_parsers().items():
        own = {flag.flag for flag in flags_of(command)} if command in ("train", "tune") else ()
        for shared in SHARED_FLAGS.values():
            if option(parser, shared.flag) and command not in shared.helps:
                assert shared.flag in own, f"cifar100 {command} {shared.flag}: add it by name"


def test_a_command_may_change_an_option_of_its_own():
    shared = SharedFlag(
        "--model", {"a": "in a", "b": "in b"}, {"type": str}, {"b": {"required": True}}
    )
    parsers = {command: argparse.ArgumentParser() for command in "ab"}
    for command, parser in parsers.items():
        shared.add_to(parser, command)
    assert parsers["a"].parse_args([]).model is None
    with pytest.raises(SystemExit):
        parsers["b"].parse_args([])  # required there only
    assert option(parsers["b"], "--model").help == "in b"


def test_add_shared_keeps_the_order_it_is_given():
    parser = argparse.ArgumentParser()
    add_shared(parser, "export", "json", "out", "calibrated")
    flags = [a.option_strings[0] for a in parser._actions[1:]]
    assert flags == ["--json", "--out", "--calibrated"]
