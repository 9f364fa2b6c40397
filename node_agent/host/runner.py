"""The command runner: the one place host-attach code starts processes.

Connectors take a ``Runner`` so tests check the exact argument lists at this
boundary (``RecordingRunner``) and production runs them (``SubprocessRunner``).
Commands are argument lists, never shell strings.  Values that must not be
logged are passed wrapped in ``Hidden``: the process gets the plain text, every
log line and error message gets ``***``.  Secrets (CHAP) never go on a command
line at all: argv is readable by every local user in /proc/PID/cmdline while the
process runs.  They go into files through the runner's ``write_private``, where
the commands that read them run.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import stat
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

    def read_private(self, path: str) -> str | None:
        """The text of the regular file ``path``, None when nothing is there; a symlink there is refused."""

    def write_private(self, path: str, text: Hidden, *, temp_dir: str | None = None) -> None:
        """Replace ``path`` atomically by a file of mode 0600 holding ``text`` (see ``SubprocessRunner``)."""


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

    def read_private(self, path: str) -> str | None:
        # O_NOFOLLOW: a symlink planted at the path is an error, never read through;
        # O_NONBLOCK: a FIFO there cannot hang the agent before fstat refuses it.
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        with os.fdopen(fd, "r", encoding="utf-8", errors="surrogateescape") as f:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise OSError(f"{path} is not a regular file")
            return f.read()

    def write_private(self, path: str, text: Hidden, *, temp_dir: str | None = None) -> None:
        """Write ``text`` to a new file of mode 0600 in ``temp_dir`` (default: ``path``'s directory, which
        must be on the same filesystem), fsync it and rename it over ``path``: a reader sees the old file
        or the new one, never a part, and the secret is never in a file others may read.

        The two directories are opened without following a symlink in their last component and the
        file is created with ``O_EXCL | O_NOFOLLOW`` and renamed relative to them, so nothing swapped
        in meanwhile redirects the write; a symlink at ``path`` itself is replaced, not followed.
        The temporary name has no comma (open-iscsi takes every ``ADDR,PORT`` entry of a target's
        directory for a node record) and is removed again when anything fails.
        """
        if not isinstance(text, Hidden):
            raise TypeError("write_private takes the text as Hidden: it holds secrets")
        directory, name = os.path.split(path)
        flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
        dir_fd = os.open(directory or ".", flags)
        try:
            temp_fd = os.open(temp_dir, flags) if temp_dir is not None else dir_fd
            try:
                self._replace(dir_fd, name, temp_fd, text.value.encode("utf-8", "surrogateescape"))
            finally:
                if temp_fd != dir_fd:
                    os.close(temp_fd)
        finally:
            os.close(dir_fd)
        log.debug("wrote %s (mode 0600)", path)

    @staticmethod
    def _replace(dir_fd: int, name: str, temp_fd: int, data: bytes) -> None:
        temp = f".shoal-{secrets.token_hex(8)}.tmp"
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                     dir_fd=temp_fd)
        try:
            try:
                os.fchmod(fd, 0o600)  # exactly: the umask may have taken the owner's bits too
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(temp, name, src_dir_fd=temp_fd, dst_dir_fd=dir_fd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temp, dir_fd=temp_fd)
            raise
        os.fsync(dir_fd)  # the rename itself survives a crash
        if temp_fd != dir_fd:
            os.fsync(temp_fd)


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
    ``files`` plays the private files (path -> text): a test puts what the
    system holds there and reads what was written; ``file_writes`` holds
    ``(len(calls) at the time, path)`` of every ``write_private``.
    """

    script: list = field(default_factory=list)
    calls: list[list[str]] = field(default_factory=list)
    shown_calls: list[list[str]] = field(default_factory=list)
    files: dict[str, str] = field(default_factory=dict)
    file_writes: list[tuple[int, str]] = field(default_factory=list)

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

    def read_private(self, path: str) -> str | None:
        return self.files.get(path)

    def write_private(self, path: str, text: Hidden, *, temp_dir: str | None = None) -> None:
        if not isinstance(text, Hidden):
            raise TypeError("write_private takes the text as Hidden: it holds secrets")
        self.file_writes.append((len(self.calls), path))
        self.files[path] = text.value
