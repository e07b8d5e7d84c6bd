"""The recipes' command line: jsonargparse around a recipe's `setup`, and every failure as one line with its own
exit status (2 bad input, 3 a failure while running, 130 Ctrl-C, 143 SIGTERM)."""

import inspect
import os
import sys
from dataclasses import fields, is_dataclass
from typing import Callable, Literal, get_args, get_origin

from jsonargparse import CLI, set_parsing_settings
from tqdm import tqdm

from finetune.signals import Stopped


class UsageError(Exception):
    """Bad input: the CLI prints the message as one line and exits with status 2."""


class Interrupted(Exception):
    """Ctrl-C or SIGTERM (``terminated``), after the training state was saved: one line and exit status 130 or 143."""

    def __init__(self, message: str, terminated: bool = False) -> None:
        super().__init__(message)
        self.terminated = terminated


EXIT_BAD_INPUT, EXIT_FAILED, EXIT_INTERRUPTED, EXIT_TERMINATED = 2, 3, 130, 143


def cli(setup: Callable) -> None:
    """jsonargparse CLI around a recipe's `setup`. Every failure is one line on stderr with its own exit status:
    2 bad input (arguments, files, data), 3 a failure while running (torch, out of memory, ...), 130 Ctrl-C, 143
    SIGTERM.
    DROPBP_TRACEBACK=1 shows the traceback of a failure instead."""
    set_parsing_settings(docstring_parse_attribute_docstrings=True)  # --help shows the dataclass fields' descriptions
    try:
        check_choices(setup, sys.argv[1:])
        CLI(setup)
    except (UsageError, ValueError, FileNotFoundError) as e:
        fail(f"error: {e}", EXIT_BAD_INPUT)
    except Interrupted as e:
        fail(f"terminated: {e}", EXIT_TERMINATED) if e.terminated else fail(f"interrupted: {e}", EXIT_INTERRUPTED)
    except Stopped as e:  # before or after training
        fail("terminated", EXIT_TERMINATED) if e.terminated else fail("interrupted", EXIT_INTERRUPTED)
    except KeyboardInterrupt:
        fail("interrupted", EXIT_INTERRUPTED)
    except Exception as e:
        if os.environ.get("DROPBP_TRACEBACK"):
            raise
        fail(f"error: {type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
             " (DROPBP_TRACEBACK=1 shows the traceback)", EXIT_FAILED)


def fail(message: str, status: int) -> None:
    for bar in list(tqdm._instances):  # an open progress bar would be drawn again at exit, after the message
        bar.close()
    print(message, file=sys.stderr)
    raise SystemExit(status)


def check_choices(setup: Callable, argv: list) -> None:
    """Refuse a bad value of a choice option (a ``Literal``) naming the valid ones: jsonargparse 4.41 reports only
    "Cannot take a Union of no types"."""
    choices = {}
    for name, param in inspect.signature(setup).parameters.items():
        if get_origin(param.annotation) is Literal:
            choices[f"--{name}"] = get_args(param.annotation)
        if is_dataclass(param.default):
            for f in fields(param.default):
                if get_origin(f.type) is Literal:
                    choices[f"--{name}.{f.name}"] = get_args(f.type)
    for i, arg in enumerate(argv):
        key, _, value = arg.partition("=")
        if key in choices and not _:
            value = argv[i + 1] if i + 1 < len(argv) else None
        if key in choices and value not in choices[key]:
            raise UsageError(f"{key} must be one of {', '.join(map(str, choices[key]))}, got {value!r}")
