"""The command runner: the one place host-attach code starts processes.

Connectors take a ``Runner`` so tests check the exact argument lists at this
boundary (``RecordingRunner``) and production runs them (``SubprocessRunner``).
Commands are argument lists, never shell strings.  Values that must not be
logged (CHAP secrets) are passed wrapped in ``Hidden``: the process gets the
plain text, every log line and error message gets ``***``.
"""

from __future__ import annotations

import logging
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol, Union

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Hidden:
    """An argument value that is passed to the command but never shown."""

    value: str = field(repr=False)

    def __str__(self) -> str:
        return "***"

    def __repr__(self) -> str:
        return "Hidden(***)"


Arg = Union[str, Hidden]


def plain(argv: Sequence[Arg]) -> list[str]:
    """The argument list the process receives."""
    return [a.value if isinstance(a, Hidden) else a for a in argv]


def shown(argv: Sequence[Arg]) -> list[str]:
    """The argument list as logged: hidden values replaced by ``***``."""
    return [str(a) for a in argv]


@dataclass(frozen=True)
class Result:
    argv: tuple[str, ...]
    """As shown (hidden values masked)."""
    returncode: int
    stdout: str
    stderr: str


class CommandFailed(Exception):
    """A command run with ``check=True`` exited non-zero; the message shows the masked argv."""

    def __init__(self, result: Result):
        self.result = result
        detail = (result.stderr or result.stdout).strip().splitlines()
        super().__init__(f"{' '.join(result.argv)} exited {result.returncode}"
                         + (f": {detail[-1]}" if detail else ""))


class Runner(Protocol):
    def run(self, argv: Sequence[Arg], *, check: bool = True, input: str | None = None) -> Result:
        """Run ``argv``; raise ``CommandFailed`` on a non-zero exit when ``check``."""


@dataclass
class SubprocessRunner:
    """Runs commands with ``subprocess.run`` (no shell), with a timeout per command."""

    timeout: float = 120.0
    """Seconds before a command is killed; iscsiadm login retries for up to ~2 min by default."""

    def run(self, argv: Sequence[Arg], *, check: bool = True, input: str | None = None) -> Result:
        masked = tuple(shown(argv))
        log.debug("run %s", " ".join(masked))
        try:
            proc = subprocess.run(plain(argv), input=input, capture_output=True, text=True, timeout=self.timeout)
        except subprocess.TimeoutExpired:
            result = Result(masked, -1, "", f"timed out after {self.timeout:g} s")
        except FileNotFoundError:
            result = Result(masked, 127, "", f"{masked[0]}: command not found")
        else:
            result = Result(masked, proc.returncode, proc.stdout, proc.stderr)
        if check and result.returncode != 0:
            raise CommandFailed(result)
        return result


Responder = Callable[[list[str]], "tuple[int, str] | tuple[int, str, str] | None"]


@dataclass
class RecordingRunner:
    """A scripted runner for tests: records every argv and answers from ``script``.

    ``script`` is a list of ``(prefix, answer)``: the first entry whose prefix
    starts the plain argv answers it.  An answer is ``(rc, stdout)``,
    ``(rc, stdout, stderr)`` or a callable taking the argv and returning one of
    those (so a test can model state, e.g. a session appearing after login).
    Unmatched commands succeed with empty output.  ``calls`` holds the plain
    argv (what the process would see); ``shown_calls`` what a log would show.
    """

    script: list = field(default_factory=list)
    calls: list[list[str]] = field(default_factory=list)
    shown_calls: list[list[str]] = field(default_factory=list)

    def on(self, *prefix: str, rc: int = 0, stdout: str = "", stderr: str = "", call: Responder | None = None):
        """Add a scripted answer (newest first, so a test can override a default)."""
        self.script.insert(0, (list(prefix), call if call is not None else (rc, stdout, stderr)))
        return self

    def run(self, argv: Sequence[Arg], *, check: bool = True, input: str | None = None) -> Result:
        args = plain(argv)
        self.calls.append(args)
        self.shown_calls.append(shown(argv))
        answer: tuple = (0, "", "")
        for prefix, response in self.script:
            if args[:len(prefix)] == prefix:
                answer = response(args) if callable(response) else response
                if answer is None:
                    continue  # the callable declined; try the next entry
                break
        rc, out, err = (tuple(answer) + ("",))[:3]
        result = Result(tuple(shown(argv)), rc, out, err)
        if check and rc != 0:
            raise CommandFailed(result)
        return result
