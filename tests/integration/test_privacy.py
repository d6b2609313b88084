"""Phone numbers, message texts and secrets stay out of logs, help texts and config dumps.

The demo runs on the sample data (plus a few bad lines) with ``NUDGEFLOW_LOG_LEVEL=debug`` and
fake Vonage / webhook / link secrets in the environment of every process; then everything it
wrote is scanned, except the three data files whose job is to hold numbers and texts
(``outbox.jsonl``, ``outcomes.jsonl``, ``decisions.jsonl``). The one intended exception: the
demo's own summary on stdout shows each sent text on a ``[text]`` line (that is the point of a
demo; it never shows the number), so those lines are not scanned for texts.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import ValidationError

from processors.commands import cli
from processors.demo.run import run_demo
from processors.devstack import BROKER_DIR
from processors.settings import REPO_ROOT, SecretFileError, Settings, redact_url

EXAMPLES = REPO_ROOT / "examples"
CAMPAIGNS = EXAMPLES / "campaigns.yaml"
# The product's output to its operator: the texts as sent (the report shows samples of them).
DATA_FILES = {"outbox.jsonl", "outcomes.jsonl", "decisions.jsonl", "report.html"}
SECRETS = {
    "NUDGEFLOW_VONAGE_API_KEY": "fakekey7f3a9c",
    "NUDGEFLOW_VONAGE_API_SECRET": "fake-vonage-secret-9b1c",
    "NUDGEFLOW_WEBHOOK_SIGNATURE_SECRET": "fake-signature-secret-44d2",
    "NUDGEFLOW_LINK_SECRET": "fake-link-secret-0e8a",
}
FILE_SECRET = "fake-secret-from-a-file-5a7e"
REDIS_PASSWORD = "fake-redis-password-c0de"


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No NUDGEFLOW_* of the runner leaks into the test (or the processes it starts)."""
    for key in [k for k in os.environ if k.startswith("NUDGEFLOW_")]:
        monkeypatch.delenv(key)
    return monkeypatch


def _phones(path: Path) -> list[str]:
    return [json.loads(x)["phone"] for x in path.read_text().splitlines() if x.strip()]


def _variants(phone: str) -> set[str]:
    digits = phone.lstrip("+")
    return {phone, digits}


@pytest.mark.integration
def test_demo_at_debug_level_logs_no_number_text_or_secret(
    tmp_path: Path, clean_env: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    # sample data plus bad lines, one of which holds a number that must not be echoed either
    events = tmp_path / "events.jsonl"
    events.write_text(EXAMPLES.joinpath("events.jsonl").read_text() + "{broken\n")
    bad_event_line = len(events.read_text().splitlines())
    contacts = tmp_path / "contacts.jsonl"
    bad_contacts = [
        {"user_id": "u-bad", "phone": "+1415555019", "consent": "opted_in"},  # too short
        {"user_id": "", "phone": "+14155550177", "consent": "opted_in"},  # no user id
    ]
    contacts.write_text(
        EXAMPLES.joinpath("contacts.jsonl").read_text()
        + "".join(json.dumps(c) + "\n" for c in bad_contacts)
    )
    n_contacts = len(contacts.read_text().splitlines())
    for key, value in SECRETS.items():
        clean_env.setenv(key, value)
    secret_file = tmp_path / "secret"
    secret_file.write_text(FILE_SECRET + "\n")
    clean_env.setenv("NUDGEFLOW_LINK_SECRET_FILE", str(secret_file))
    clean_env.setenv("NUDGEFLOW_LOG_LEVEL", "debug")

    out = tmp_path / "out"
    assert run_demo(events, CAMPAIGNS, contacts, out) == 0
    captured = capfd.readouterr()

    # bad lines: reported with their number, skipped, the run went on
    assert f"{events}:{bad_event_line}: skipped: not valid JSON" in captured.err
    for line in (n_contacts - 1, n_contacts):
        assert f"{contacts}:{line}: skipped:" in captured.err
    assert "2 skipped" in captured.out and "1 bad lines skipped" in captured.out

    texts = [json.loads(x)["text"] for x in (out / "outbox.jsonl").read_text().splitlines()]
    assert len(texts) >= 5
    campaign_source = CAMPAIGNS.read_text()
    # every personalised line of every text (the footer is campaign configuration, not data)
    text_lines = {ln for t in texts for ln in t.splitlines() if ln not in campaign_source}
    phones = {v for p in _phones(contacts) + [c["phone"] for c in bad_contacts]
              for v in _variants(p)}  # fmt: skip
    secrets = {*SECRETS.values(), FILE_SECRET}

    written = {p: p.read_text(errors="replace") for p in out.rglob("*") if p.is_file()}
    logs = out / "logs"
    assert "[DEBUG]" in written[logs / "worker.log"], "NUDGEFLOW_LOG_LEVEL=debug reached Faust"
    broker_data = out / ".stack" / BROKER_DIR / "data"  # the broker's log segments: the data
    scanned = {
        str(p): text
        for p, text in written.items()
        if p.name not in DATA_FILES and broker_data not in p.parents
    }
    assert any(broker_data in p.parents for p in written)  # the exclusion names a real place
    scanned["stderr"] = captured.err
    scanned["stdout"] = captured.out
    scanned["stdout without [text] lines"] = "\n".join(
        ln for ln in captured.out.splitlines() if not ln.startswith("[text] ")
    )
    assert len(scanned) >= 6, sorted(scanned)  # logs, stack logs, report, ...
    leaks = []
    for name, content in scanned.items():
        leaks += [(name, "phone", p) for p in phones if p in content]
        leaks += [(name, "secret", s) for s in secrets if s in content]
        if name != "stdout":
            leaks += [(name, "text", t) for t in text_lines if t in content]
    assert leaks == []
    assert any(p in written[out / "outbox.jsonl"] for p in phones)  # the scan would see them


# ------------------------------------------------------------------ help texts and config dumps


def _all_parsers(parser: argparse.ArgumentParser, path: str) -> Iterator[tuple[str, str]]:
    yield path, parser.format_help()
    for action in parser._actions:  # argparse keeps sub-commands here
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _all_parsers(sub, f"{path} {name}")


def test_help_of_every_command_prints_no_secret(
    tmp_path: Path, clean_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for key, value in SECRETS.items():
        clean_env.setenv(key, value)
    clean_env.setenv("NUDGEFLOW_REDIS_URL", f"redis://:{REDIS_PASSWORD}@localhost:6379/0")
    seen = []
    for command in cli.COMMANDS:
        clean_env.setattr(sys, "argv", ["nudgeflow", command])
        parser, _modules = cli.build_parser()  # imports the command's module, adds its flags
        for path, text in _all_parsers(parser, "nudgeflow"):
            seen.append(path)
            for secret in (*SECRETS.values(), REDIS_PASSWORD):
                assert secret not in text, (path, secret)
        clean_env.setattr(sys, "argv", ["nudgeflow"])
        with pytest.raises(SystemExit) as exit_info:
            cli.main([command, "--help"])
        assert exit_info.value.code == 0
        printed = capsys.readouterr()
        assert printed.out.startswith(f"usage: nudgeflow {command}")
        for secret in (*SECRETS.values(), REDIS_PASSWORD):
            assert secret not in printed.out + printed.err
    assert {"nudgeflow webhooks", "nudgeflow contacts import", "nudgeflow dev up"} <= set(seen)


def test_settings_repr_and_json_dump_never_show_secrets(
    tmp_path: Path, clean_env: pytest.MonkeyPatch
) -> None:
    for key, value in SECRETS.items():
        clean_env.setenv(key, value)
    secret_file = tmp_path / "vonage-secret"
    secret_file.write_text(FILE_SECRET + "\r\n")
    clean_env.delenv("NUDGEFLOW_VONAGE_API_SECRET")
    clean_env.setenv("NUDGEFLOW_VONAGE_API_SECRET_FILE", str(secret_file))
    clean_env.setenv("NUDGEFLOW_REDIS_URL", f"redis://:{REDIS_PASSWORD}@redis:6379/0")
    clean_env.setenv(
        "NUDGEFLOW_SCHEMA_REGISTRY_URL", f"https://svc:{REDIS_PASSWORD}x@registry.example:8081"
    )
    settings = Settings.load()
    # the values are there for the code that needs them...
    assert settings.vonage_api_secret is not None
    assert settings.vonage_api_secret.get_secret_value() == FILE_SECRET  # line break stripped
    assert settings.vonage_api_key is not None
    assert settings.vonage_api_key.get_secret_value() == SECRETS["NUDGEFLOW_VONAGE_API_KEY"]
    assert REDIS_PASSWORD in settings.redis_url
    # ...and in no dump
    dumps = {
        "repr": repr(settings),
        "str": str(settings),
        "json": settings.model_dump_json(),
        "dict": str(settings.model_dump()),
        "fields": " ".join(repr(getattr(settings, f)) for f in Settings.model_fields),
    }
    for how, text in dumps.items():
        for secret in (*SECRETS.values(), FILE_SECRET):
            assert secret not in text, (how, secret)
    for how in ("repr", "str", "json"):
        assert REDIS_PASSWORD not in dumps[how], how
    assert "redis://:**********@redis:6379/0" in dumps["json"]


def test_the_variable_wins_over_the_file(tmp_path: Path, clean_env: pytest.MonkeyPatch) -> None:
    secret_file = tmp_path / "s"
    secret_file.write_text("from-file")
    clean_env.setenv("NUDGEFLOW_WEBHOOK_SIGNATURE_SECRET_FILE", str(secret_file))
    secret = Settings.load().webhook_signature_secret
    assert secret is not None and secret.get_secret_value() == "from-file"
    clean_env.setenv("NUDGEFLOW_WEBHOOK_SIGNATURE_SECRET", "from-env")
    secret = Settings.load().webhook_signature_secret
    assert secret is not None and secret.get_secret_value() == "from-env"


def test_unreadable_secret_file_is_a_clear_error_without_the_secret(
    tmp_path: Path, clean_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "nope"
    clean_env.setenv("NUDGEFLOW_VONAGE_API_SECRET_FILE", str(missing))
    with pytest.raises(SecretFileError, match="NUDGEFLOW_VONAGE_API_SECRET_FILE: cannot read"):
        Settings.load()
    binary = tmp_path / "binary"
    binary.write_bytes(b"\xff\xfe" + FILE_SECRET.encode())
    clean_env.setenv("NUDGEFLOW_VONAGE_API_SECRET_FILE", str(binary))
    with pytest.raises(SecretFileError, match="not UTF-8") as info:
        Settings.load()
    assert FILE_SECRET not in str(info.value)
    # a command stops with exit code 2 and one line, no traceback
    clean_env.setattr(sys, "argv", ["nudgeflow"])
    code = cli.main(["backtest", "--campaigns", str(CAMPAIGNS), "--events", str(missing)])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("nudgeflow backtest: NUDGEFLOW_VONAGE_API_SECRET_FILE: ")
    assert "Traceback" not in err and FILE_SECRET not in err


def test_log_level_setting(clean_env: pytest.MonkeyPatch) -> None:
    assert Settings.load().log_level is None  # each command keeps its own default
    for raw, level in (("DEBUG", "debug"), ("warn", "warning"), (" Error ", "error")):
        clean_env.setenv("NUDGEFLOW_LOG_LEVEL", raw)
        assert Settings.load().log_level == level
    clean_env.setenv("NUDGEFLOW_LOG_LEVEL", "chatty")
    with pytest.raises(ValidationError):
        Settings.load()


@pytest.mark.parametrize(
    "url, shown",
    [
        ("redis://:pw@host:6379/0", "redis://:**********@host:6379/0"),
        ("rediss://default:p%40ss@host", "rediss://default:**********@host"),
        ("https://user:pw@registry:8081/path", "https://user:**********@registry:8081/path"),
        ("redis://host:6379/0", "redis://host:6379/0"),
        ("mock://nudgeflow", "mock://nudgeflow"),
    ],
)
def test_redact_url(url: str, shown: str) -> None:
    assert redact_url(url) == shown
