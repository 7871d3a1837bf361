"""The shared front of every command: exit statuses, the error line, non-UTF-8 names, warnings."""

from __future__ import annotations

import os
import signal
import warnings

import pytest

from hevc_vit.cli import build_parser, main
from hevc_vit.cli.common import EXIT_FAILED, EXIT_INPUT, EXIT_OK, printable, run_guarded


def test_every_command_is_registered():
    commands = build_parser()._subparsers._group_actions[0].choices
    assert {"encode", "convert", "info", "bench", "codec-preview"} <= set(commands)


@pytest.mark.parametrize(
    "error, status",
    [
        (ValueError("bad value"), EXIT_INPUT),
        (FileNotFoundError("no such file"), EXIT_INPUT),
        (FileExistsError("exists"), EXIT_INPUT),
        (ImportError("install the video extra"), EXIT_INPUT),
        (OSError(28, "No space left on device"), EXIT_FAILED),
    ],
)
def test_library_errors_become_one_line_and_an_exit_status(capsys, error, status):
    def body():
        raise error

    assert run_guarded("demo", body) == status
    err = capsys.readouterr().err
    assert err.startswith("hevc-vit demo: error: ") and err.count("\n") == 1
    assert str(error) in err


def test_interrupts_exit_with_128_plus_the_signal(capsys):
    def body():
        error = KeyboardInterrupt("stopped")
        error.signum = signal.SIGTERM
        raise error

    assert run_guarded("demo", body, interrupted="nothing written") == 128 + signal.SIGTERM
    assert "hevc-vit demo: stopped; nothing written" in capsys.readouterr().err
    assert run_guarded("demo", lambda: (_ for _ in ()).throw(KeyboardInterrupt())) == 130


def test_a_bug_is_not_hidden():
    with pytest.raises(ZeroDivisionError):
        run_guarded("demo", lambda: 1 / 0)
    assert run_guarded("demo", lambda: None) == EXIT_OK and run_guarded("demo", lambda: 3) == 3


def test_names_that_are_not_utf8_print_as_their_bytes(capsys):
    name = os.fsdecode(b"photo-\xff\xfe.jpg")  # how Python holds such a file name: surrogate escapes
    assert printable(name) == "photo-\\xff\\xfe.jpg"
    run_guarded("demo", lambda: (_ for _ in ()).throw(ValueError(f"{name} is not an image")))
    assert "photo-\\xff\\xfe.jpg is not an image" in capsys.readouterr().err


def test_warnings_print_as_one_line(capsys):
    def body():
        warnings.warn("something to know\nacross lines", UserWarning, stacklevel=1)

    assert run_guarded("demo", body) == EXIT_OK
    err = capsys.readouterr().err
    assert err.startswith("hevc-vit demo: warning: something to know")


def test_bad_arguments_exit_2(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["convert"])  # SRC and DST missing
    assert exc.value.code == 2


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--jpeg-draft", "maybe"], "argument --jpeg-draft: 'maybe'; expected on or off"),
        (["--exif-transpose", "sometimes"], "argument --exif-transpose: 'sometimes'; expected on or off"),
        (["--codec-budget", "lots"], "argument --codec-budget: 'lots'; expected a patch count K >= 1 or a ratio"),
        (["--workers", "two"], "argument --workers: 'two'; expected an integer"),
    ],
)
def test_encode_option_values_that_do_not_parse_are_named_with_what_was_expected(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["encode", "x", *argv])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
