"""User-facing errors and the one check for numbers that users type.

The CLI prints a UserError's message (no traceback) and exits non-zero. Every number that comes
from a user (a config field, a command-line argument, a search-space bound) passes ``check_number``
so that NaN and infinity are refused in one place, with the name of the field and what is allowed.
"""
from __future__ import annotations

import argparse
import math
import sys
from typing import Any, Callable


class UserError(Exception):
    """Something the user must fix (a path, an argument, a file); the message says what and how."""


def run_guarded(fn: Callable[[list[str]], int], argv: list[str]) -> int:
    """Run a command's ``main(argv)``; a UserError becomes one line on stderr and exit status 2, an
    interrupt exit status 130 (no traceback for either)."""
    try:
        return fn(argv) or 0
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def allowed_range(low: Any = None, high: Any = None) -> str:
    return f"{low if low is not None else '-inf'} .. {high if high is not None else 'inf'}"


def check_number(name: str, value: Any, low: Any = None, high: Any = None, *, integer: bool = False,
                 error: type[Exception] = UserError) -> Any:
    """Return ``value`` if it is a finite number in [low, high] (an int when ``integer``), else raise.

    ``bool`` is not a number here (YAML reads ``yes`` as True); NaN fails every comparison, so it
    would pass a plain range check: it is refused first, with infinity.
    """
    kind = "an integer" if integer else "a finite number"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        raise error(f"{name}={value!r} is not {kind}; allowed: {allowed_range(low, high)}")
    if isinstance(value, float) and not math.isfinite(value):
        raise error(f"{name}={value!r} is not {kind}; allowed: {allowed_range(low, high)}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise error(f"{name}={value!r} is out of range; allowed: {allowed_range(low, high)}")
    return value


def number_arg(low: Any = None, high: Any = None, *, integer: bool = False) -> Callable[[str], Any]:
    """An argparse ``type=`` that parses and checks a number: ``--mem-gb nan`` is a usage error."""
    def parse(text: str) -> Any:
        try:
            value = int(text) if integer else float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not {'an integer' if integer else 'a number'}; allowed: {allowed_range(low, high)}"
            ) from None
        try:
            return check_number("value", value, low, high, integer=integer)
        except UserError as e:
            raise argparse.ArgumentTypeError(str(e).replace("value=", "", 1)) from None
    parse.__name__ = "integer" if integer else "number"
    return parse


def check_output_folder(name: str, path: str) -> None:
    """An output folder argument must be a folder or not exist yet (its parents may be created)."""
    from pathlib import Path

    p = Path(path)
    for part in (p, *p.parents):
        if part.exists() and not part.is_dir():
            raise UserError(f"{name} {path}: {part} is a file, not a folder; pass a folder")
        if part.is_dir():
            break


def check_device(name: str, text: str):
    """A torch device named by the user that exists on this machine: cpu, cuda, cuda:N."""
    import torch

    try:
        device = torch.device(text)
    except RuntimeError:
        raise UserError(f"{name} {text!r} is not a device; use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise UserError(f"{name} {text}: this machine has no CUDA device; use cpu")
        if device.index is not None and device.index >= count:
            raise UserError(f"{name} {text}: this machine has {count} CUDA device(s), cuda:0 .. cuda:{count - 1}")
    elif device.type != "cpu":
        raise UserError(f"{name} {text!r}: only cpu and cuda devices are supported")
    return device
