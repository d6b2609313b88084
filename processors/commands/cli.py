"""The ``nudgeflow`` command line: one sub-command per module, imported lazily.

Only the module of the sub-command being run is imported (``nudgeflow dev status`` does not pay
for importing Faust), so ``nudgeflow --help`` lists every command from :data:`COMMANDS` alone.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from processors.settings import SecretFileError

DESCRIPTION = "NudgeFlow: behaviour-triggered SMS from a Kafka clickstream, in real time."

# sub-command -> (module, one-line help). Each module offers add_arguments(parser) and run(args).
COMMANDS: dict[str, tuple[str, str]] = {
    "dev": ("processors.commands.dev", "start/stop/inspect the embedded broker and Redis"),
    "produce": ("processors.commands.produce", "send canonical events from a JSON Lines/CSV file"),
    "worker": ("streams.worker", "run the trigger worker (campaign decisions from events)"),
    "dispatcher": ("processors.dispatcher", "run the SMS dispatcher"),
    "contacts": ("processors.commands.contacts", "import contact profiles into the contacts topic"),
    "demo": ("processors.commands.demo", "run the whole pipeline on the embedded stack"),
    "backtest": ("processors.commands.backtest", "replay a file of events through the campaigns"),
    "simulate": ("processors.commands.simulate", "generate a realistic synthetic clickstream"),
    "webhooks": ("processors.webhooks", "serve delivery receipts, inbound texts and short links"),
    "attribution": (
        "processors.commands.attribution",
        "attribute conversions to texts (last touch)",
    ),
    "report": (
        "processors.commands.report",
        "write the HTML report of a demo directory or the topics",
    ),
}

EXAMPLES = """\
examples:
  nudgeflow dev up                            start the embedded broker and Redis
  export NUDGEFLOW_PROFILE=dev                then point the commands below at them
  nudgeflow produce examples/events.jsonl     send the example events
  nudgeflow worker                            decide which texts to send
  nudgeflow dispatcher                        send them (the dev profile writes an outbox file)
  nudgeflow demo                              the whole pipeline in one go, with a report
  nudgeflow COMMAND --help                    the options of one command
"""


def _overview() -> str:
    """The description: one line, then every command on a line of its own."""
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {help_text}" for name, (_, help_text) in COMMANDS.items()]
    return "\n".join([DESCRIPTION, "", "commands:", *lines])


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, object]]:
    """The parser, and the imported module of the sub-command named in ``sys.argv`` (if any)."""
    parser = argparse.ArgumentParser(
        prog="nudgeflow",
        description=_overview(),
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    # The commands are listed in the description (argparse would wrap the long names' help).
    sub = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", help=argparse.SUPPRESS
    )
    parser.usage = "%(prog)s [-h] COMMAND [ARGS ...]"  # after add_subparsers: "nudgeflow worker"
    modules: dict[str, object] = {}
    wanted = sys.argv[1] if len(sys.argv) > 1 else None
    for name, (module_name, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        # Import only the module of the command being run (keeps --help and start-up fast).
        if name == wanted:
            module = importlib.import_module(module_name)
            module.add_arguments(p)  # type: ignore[attr-defined]
            modules[name] = module
    return parser, modules


def main(argv: list[str] | None = None) -> int:
    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    parser, modules = build_parser()
    args = parser.parse_args()
    module = modules[args.command]
    try:
        code = module.run(args)  # type: ignore[attr-defined]
    except SecretFileError as exc:  # NUDGEFLOW_*_FILE names an unreadable file
        print(f"nudgeflow {args.command}: {exc}", file=sys.stderr)
        return 2
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
