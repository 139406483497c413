"""Argument types shared by the subcommands: a bad number is a one-line usage error."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from cifar100.config.limits import RANGES, SEED_MAX

PORT_MAX = 65535


def _number(kind, text: str):
    try:
        return kind(text)
    except ValueError:
        what = "a whole number" if kind is int else "a number"
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None


def positive_int(text: str) -> int:
    value = _number(int, text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def shift_pixels(text: str) -> int:
    """A test-time shift in pixels, in the range train.tta_translate allows."""
    value, allowed = _number(int, text), RANGES["train.tta_translate"]
    if value not in allowed:
        raise argparse.ArgumentTypeError(f"must be {allowed} pixels, got {value}")
    return value


def seed(text: str) -> int:
    value = _number(int, text)
    if not 0 <= value <= SEED_MAX:
        raise argparse.ArgumentTypeError(f"must be in [0, {SEED_MAX}], got {value}")
    return value


def positive_float(text: str) -> float:
    value = _number(float, text)
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number above 0, got {text}")
    return value


def fraction(text: str) -> float:
    value = _number(float, text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1), got {text}")
    return value


def probability(text: str) -> float:
    """A probability or mixing weight: in [0, 1], both ends included."""
    value = _number(float, text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text}")
    return value


def port(text: str) -> int:
    """A TCP port to listen on; 0 (any free port) is refused too: the user must be able to
    open the page at the port they gave."""
    value = _number(int, text)
    if not 1 <= value <= PORT_MAX:
        raise argparse.ArgumentTypeError(f"must be a port in [1, {PORT_MAX}], got {value}")
    return value


def setting(key: str) -> Callable[[str], float]:
    """A number in the range ``config.limits.RANGES`` gives the setting ``key``: the flag
    refuses what the setting would refuse, as a usage error."""
    allowed = RANGES[key]

    def parse(text: str) -> float:
        value = _number(float, text)
        if value not in allowed:
            raise argparse.ArgumentTypeError(f"must be {allowed}, got {text}")
        return value

    parse.__name__ = key  # argparse names the type in some messages
    return parse
