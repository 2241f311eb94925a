"""What the command-line tools share: one-line errors (exit code 2), help texts with defaults,
and reading a prompt file as UTF-8 text."""

from __future__ import annotations

import argparse
import os
import sys

from minference_jax.pattern_spec import parse_values

EXIT_USAGE = 2


class CliError(Exception):
    """A user error: printed as one line, exit code 2, no traceback."""


class _HelpWithDefaults(argparse.RawDescriptionHelpFormatter):
    """Appends "(default: X)" to every optional argument's help unless the help names it."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.required or action.default is argparse.SUPPRESS:
            return text
        return f"{text} (default: %(default)s)"


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (`error: ...`) and exit code 2."""

    def __init__(self, **kwargs):
        # Usage lines name the command as typed: the console script (minference-prefill) when
        # started through one, else the `prog` given ("python -m minference_jax.prefill").
        script = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
        if script.startswith("minference-"):
            kwargs["prog"] = script
        super().__init__(formatter_class=_HelpWithDefaults, **kwargs)

    def error(self, message):
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(EXIT_USAGE)


def fail(err: BaseException | str) -> int:
    """Print a user error as one line on stderr; returns the exit code."""
    print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
    return EXIT_USAGE


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def check_at_least(name: str, value: int | None, minimum: int) -> None:
    if value is not None and value < minimum:
        raise CliError(f"{name} must be >= {minimum}, got {value}")


def parse_budget(text: str) -> tuple[int | float, ...]:
    """'1000,6096' -> (1000, 6096), '0.9,8' -> (0.9, 8): comma-separated sizes in
    [0, 2**31) or finite non-negative fractions (argparse type)."""
    try:
        return parse_values(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def decode_prompt(data: bytes, source: str) -> str:
    """UTF-8 text of a prompt file, or a CliError saying why it is not one."""
    if b"\x00" in data:
        raise CliError(f"{source} holds NUL bytes: a binary file, not a text prompt")
    try:
        return data.decode("utf-8-sig")  # a leading byte-order mark is an encoding mark, not text
    except UnicodeDecodeError as err:
        raise CliError(f"{source} is not UTF-8 text ({err.reason} at byte {err.start})") from err


def read_prompt_file(path: str) -> str:
    """The text of a prompt file ('-': stdin), as UTF-8."""
    if path == "-":
        stream = getattr(sys.stdin, "buffer", None)
        if stream is None:  # a text stream without bytes underneath (tests, embedding)
            return sys.stdin.read()
        return decode_prompt(stream.read(), "stdin")
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as err:
        raise CliError(f"cannot read prompt file {path}: {err.strerror or err}") from err
    return decode_prompt(data, f"prompt file {path}")


# Characters that print nothing: a prompt made only of these (and whitespace) is empty.
_INVISIBLE = dict.fromkeys(map(ord, "\ufeff\u200b\u200c\u200d\u2060\u00ad"))


def check_not_empty(text: str) -> str:
    """Refuse a prompt with nothing visible in it (whitespace, BOMs, zero-width characters)."""
    if not text.translate(_INVISIBLE).strip():
        raise CliError("empty prompt (nothing but whitespace or invisible characters)")
    return text


def check_text(text: str, source: str) -> str:
    """Raise when `text` cannot be encoded as UTF-8 (e.g. undecodable bytes in argv)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise CliError(f"{source} is not valid UTF-8 text") from err
    return text
