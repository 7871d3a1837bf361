"""What every ``hevc-vit`` command shares: its exit statuses, its error line, and the guard that maps the
library's exceptions to them.

Exit statuses, the same for every command:
    0   ok
    1   the command ran and failed (verification failed, an input could not be encoded, the output could not be written)
    2   invalid input (a bad argument, a missing or refused file, an existing output): nothing was done
    130 interrupted by SIGINT (Ctrl-C), 143 by SIGTERM: ``128 + signal number``

A command's ``run(args)`` wraps its work in :func:`run_guarded`::

    def run(args) -> int:
        return run_guarded("bench", lambda: _bench(args))
"""

from __future__ import annotations

import argparse
import difflib
import math
import signal
import sys
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_INPUT = 2
EXIT_SIGINT = 128 + signal.SIGINT  # 130
EXIT_SIGTERM = 128 + signal.SIGTERM  # 143

# exceptions that mean the caller's input was wrong (exit 2) and those that mean the work failed (exit 1);
# the first match wins, so FileNotFoundError (an OSError) is invalid input
INPUT_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, FileExistsError, ImportError)
FAILED_ERRORS: tuple[type[BaseException], ...] = (OSError,)


def signal_exit_status(signum: int) -> int:
    """The shell's status for a process stopped by signal ``signum``: ``128 + signum``."""
    return 128 + int(signum)


def printable(text: object) -> str:
    """``text`` safe to print on any terminal: a file name that is not valid UTF-8 (held by Python as
    surrogate escapes) shows its bytes as ``\\xNN`` instead of making ``print`` raise."""
    text = str(text)
    try:
        data = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a lone surrogate that is not an escaped byte
        data = text.encode("utf-8", "backslashreplace")
    return data.decode("utf-8", "backslashreplace")


def print_notice(command: str, message: str) -> None:
    """``hevc-vit COMMAND: MESSAGE`` on stderr."""
    print(f"hevc-vit {command}: {printable(message)}", file=sys.stderr, flush=True)


def print_error(command: str, message: str, status: int = EXIT_INPUT) -> int:
    """``hevc-vit COMMAND: error: MESSAGE`` on stderr; returns ``status`` for the caller to exit with."""
    print_notice(command, f"error: {message}")
    return status


@contextmanager
def plain_warnings(command: str) -> Iterator[None]:
    """Warnings as one ``hevc-vit COMMAND: warning: ...`` line, without the source line."""
    previous = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        print_notice(command, f"warning: {message}")

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = previous


def run_guarded(
    command: str,
    body: Callable[[], int | None],
    *,
    interrupted: str | Callable[[KeyboardInterrupt], str] = "",
    input_errors: tuple[type[BaseException], ...] = INPUT_ERRORS,
    failed_errors: tuple[type[BaseException], ...] = FAILED_ERRORS,
    warnings_as_lines: bool = True,
) -> int:
    """Run ``body`` (a command's work; returns its exit status, None for 0) and turn what it raises into
    an exit status and one line on stderr:

    * ``input_errors`` -> :data:`EXIT_INPUT` (``hevc-vit COMMAND: error: MESSAGE``);
    * ``failed_errors`` -> :data:`EXIT_FAILED` (the same line);
    * ``KeyboardInterrupt`` -> ``128 + signum`` (its ``signum`` attribute where it has one, else SIGINT),
      ``hevc-vit COMMAND: interrupted; NOTE`` — ``interrupted`` gives the note (or makes it from the
      exception), e.g. what was kept.

    SIGTERM (what ``timeout``, Slurm and Kubernetes send) and SIGHUP stop the body as Ctrl-C does
    (:func:`stop_signals_interrupt`), so its clean-up runs. Anything else propagates (a bug: the traceback is
    wanted). ``warnings_as_lines``: warnings are printed
    as one line each while ``body`` runs (:func:`plain_warnings`).
    """
    try:
        with plain_warnings(command) if warnings_as_lines else _nothing(), stop_signals_interrupt():
            status = body()
    except KeyboardInterrupt as e:
        note = interrupted(e) if callable(interrupted) else interrupted
        what = str(e) or "interrupted"
        print_notice(command, f"{what}; {note}" if note else what)
        return signal_exit_status(getattr(e, "signum", signal.SIGINT))
    except input_errors as e:
        return print_error(command, str(e), EXIT_INPUT)
    except failed_errors as e:
        return print_error(command, str(e), EXIT_FAILED)
    return EXIT_OK if status is None else int(status)


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGHUP arrived: raised in the main thread wherever it was, as Ctrl-C raises KeyboardInterrupt,
    so the command's clean-up runs; ``signum`` gives the exit status."""

    def __init__(self, signum: int):
        self.signum = int(signum)
        super().__init__(f"interrupted by {signal.Signals(signum).name}")


@contextmanager
def stop_signals_interrupt() -> Iterator[None]:
    """SIGTERM and SIGHUP raise :class:`Interrupted` inside the block (once: a repeat while the clean-up runs is
    ignored; SIGKILL remains for a caller that will not wait). Nothing is installed outside the main thread or
    for a signal that is ignored (``nohup``); the previous handlers come back after."""
    previous: dict[int, object] = {}
    raised: list[int] = []

    def handle(signum: int, frame) -> None:
        if not raised:
            raised.append(signum)
            raise Interrupted(signum)

    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, getattr(signal, "SIGHUP", None)):
            if sig is not None and signal.getsignal(sig) is not signal.SIG_IGN:
                previous[sig] = signal.signal(sig, handle)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextmanager
def _nothing() -> Iterator[None]:
    yield


# --------------------------------------------------------------------------------------------------
# parsing: no abbreviations, a suggestion for a mistyped option, numbers checked against their range
# --------------------------------------------------------------------------------------------------


class ArgumentParser(argparse.ArgumentParser):
    """The parser of every ``hevc-vit`` command: an option is spelled in full (``allow_abbrev=False``, so
    ``--max-token`` is not silently taken as ``--max-tokens``); subparsers are made of this class too."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def parse_args(self, args=None, namespace=None):
        """As argparse's, but an unknown option exits 2 naming the closest option of the command it was given to."""
        parsed, unknown = self.parse_known_args(args, namespace)
        if unknown:
            command = self._command_parser(parsed)
            command.error(unknown_arguments_message(command, unknown))
        return parsed

    def _command_parser(self, parsed: argparse.Namespace) -> argparse.ArgumentParser:
        """The parser of the subcommand ``parsed`` chose (this one when it has none)."""
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction):
                chosen = getattr(parsed, action.dest, None)
                if chosen in action.choices:
                    return action.choices[chosen]
        return self


def unknown_arguments_message(parser: argparse.ArgumentParser, unknown: Sequence[str]) -> str:
    """``unrecognized arguments: ...``, with the closest option of ``parser`` for each mistyped one."""
    options = [flag for action in parser._actions for flag in action.option_strings if flag.startswith("--")]
    parts = []
    for arg in unknown:
        name = arg.split("=", 1)[0]
        close = difflib.get_close_matches(name, options, n=1, cutoff=0.6) if name.startswith("-") else []
        parts.append(f"{arg} (did you mean {close[0]}?)" if close else arg)
    return "unrecognized arguments: " + " ".join(parts)


def integer_in(low: int, high: int) -> Callable[[str], int]:
    """An argparse ``type``: an integer from ``low`` to ``high``, else an error naming the value and the range."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{text!r}; expected an integer from {low} to {high}")
        return value

    return parse


def number_in(low: float, high: float, low_open: bool = False) -> Callable[[str], float]:
    """An argparse ``type``: a finite number in ``[low, high]`` (``(low, high]`` with ``low_open``)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        above = value > low if low_open else value >= low
        if not (math.isfinite(value) and above and value <= high):
            interval = f"{'(' if low_open else '['}{low:g}, {high:g}]"
            raise argparse.ArgumentTypeError(f"{text!r}; expected a number in {interval}")
        return value

    return parse
