"""The ``nudgeflow`` command. Each sub-command lives in its own module and is imported lazily,
so ``nudgeflow dev status`` does not pay for importing Faust."""

from __future__ import annotations

import argparse
import importlib
import sys

from processors.settings import SecretFileError

# sub-command -> (module, one-line help). Each module offers add_arguments(parser) and run(args).
COMMANDS: dict[str, tuple[str, str]] = {
    "dev": ("processors.devstack", "start/stop/inspect the embedded broker and Redis"),
    "produce": ("processors.produce", "send canonical events from a JSON Lines/CSV file"),
    "worker": ("streams.worker", "run the Faust trigger worker"),
    "dispatcher": ("processors.dispatcher", "run the SMS dispatcher"),
    "contacts": ("processors.contacts_import", "import contact profiles into the contacts topic"),
    "demo": ("processors.demo", "run the whole pipeline on the embedded stack"),
    "backtest": ("processors.backtest", "replay a file of events through the campaigns"),
    "simulate": ("processors.simulate", "generate a realistic synthetic clickstream"),
    "webhooks": ("processors.webhooks", "serve delivery receipts, inbound texts and short links"),
    "attribution": ("processors.attribution", "attribute conversions to texts (last touch)"),
    "report": ("processors.report", "write the HTML report of a demo directory or the topics"),
}


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, object]]:
    parser = argparse.ArgumentParser(prog="nudgeflow", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    modules: dict[str, object] = {}
    wanted = sys.argv[1] if len(sys.argv) > 1 else None
    for name, (module_name, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text)
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
