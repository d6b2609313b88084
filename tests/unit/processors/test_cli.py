"""``nudgeflow --help``: a one-line description, every command on its own line, examples; and the
sub-commands stay lazily imported (the help imports none of their modules)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from processors.commands.cli import COMMANDS

# What each command's module pulls in; none of it may load for the top-level help.
_HEAVY = ("faust", "confluent_kafka", "streams.worker", "processors.dispatcher", "aiohttp")


def _nudgeflow(*args: str) -> subprocess.CompletedProcess[str]:
    code = (
        "import sys\n"
        "from processors.commands import cli\n"
        "try:\n"
        "    cli.main(sys.argv[1:])\n"
        "except SystemExit as exc:\n"
        "    code = exc.code\n"
        f"loaded = [m for m in {_HEAVY!r} if m in sys.modules]\n"
        "print('LOADED', ','.join(loaded), file=sys.stderr)\n"
        "sys.exit(code)\n"
    )
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "COLUMNS": "100"},
    )


def test_top_level_help_lists_every_command_once_with_examples_and_no_internals() -> None:
    done = _nudgeflow("--help")
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert out.startswith("usage: nudgeflow [-h] COMMAND [ARGS ...]\n")
    description = out.split("\n\n")[1]
    assert description.count("\n") == 0 and "SMS" in description
    for name, (_, help_text) in COMMANDS.items():
        # One line per command: its name and its whole help, unwrapped.
        assert re.search(rf"^  {name} +{re.escape(help_text)}$", out, re.M), name
    for example in (
        "nudgeflow dev up",
        "nudgeflow produce examples/events.jsonl",
        "nudgeflow worker",
        "nudgeflow dispatcher",
        "nudgeflow demo",
    ):
        assert re.search(rf"^  {re.escape(example)}  +\S", out, re.M), example
    for chatter in ("imported", "importing", "lazily", "Faust", "module", "pay for"):
        assert chatter not in out
    assert done.stderr.strip() == "LOADED"  # no sub-command module was imported for the help


def test_sub_command_help_imports_only_its_module_and_shows_its_line() -> None:
    done = _nudgeflow("produce", "--help")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: nudgeflow produce ")
    assert COMMANDS["produce"][1] in done.stdout
    loaded = done.stderr.strip().removeprefix("LOADED").strip().split(",")
    assert "faust" not in loaded and "streams.worker" not in loaded


def test_no_command_is_a_usage_error() -> None:
    done = _nudgeflow()
    assert done.returncode == 2
    assert "required: COMMAND" in done.stderr
