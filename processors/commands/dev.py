"""``nudgeflow dev up/down/status``: the embedded broker and Redis for development."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import IO

from processors.devstack.info import StackError, StackInfo
from processors.devstack.stack import EmbeddedStack
from processors.devstack.topics import create_topics, topic_specs
from processors.settings import Settings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--state-dir",
        type=Path,
        default=None,
        help="where stack.json and the logs live (default: settings.state_dir)",
    )
    sub = parser.add_subparsers(dest="action", required=True)
    up = sub.add_parser("up", parents=[common], help="start broker + Redis and create the topics")
    up.add_argument(
        "--redis-cluster",
        action="store_true",
        help="a local Redis Cluster (3 masters + 3 replicas, redis+cluster:// URL) instead of "
        "one redis-server",
    )
    sub.add_parser("down", parents=[common], help="stop the processes `up` started")
    sub.add_parser("status", parents=[common], help="print addresses and health")


def _print_info(info: StackInfo, out: IO[str]) -> None:
    def health(ok: bool) -> str:
        return "healthy" if ok else "NOT ANSWERING"

    print(
        f"broker  {info.bootstrap_servers:<28} pid {info.broker_pid:<8} "
        f"{health(info.broker_healthy)}  {info.broker_version or 'unknown broker'}",
        file=out,
    )
    if info.redis_cluster:
        print(
            f"redis   {info.redis_url:<28} {len(info.redis_nodes)} nodes "
            f"{health(info.redis_healthy)}  Redis Cluster (3 masters + 3 replicas)",
            file=out,
        )
        for n in info.redis_nodes:
            print(f"        node {n.address:<23} pid {n.pid}", file=out)
    else:
        print(
            f"redis   {info.redis_url:<28} pid {info.redis_pid:<8} {health(info.redis_healthy)}",
            file=out,
        )
    print(f"state   {info.state_file}  (up {time.time() - info.started_at:.0f} s)", file=out)


def run(args: argparse.Namespace) -> int:
    state_dir: Path = (args.state_dir or Settings.load(profile="dev").state_dir).resolve()
    stack = EmbeddedStack()
    out = sys.stdout
    try:
        if args.action == "up":
            info = stack.up(state_dir, redis_cluster=args.redis_cluster)
            settings = Settings.load(profile="dev", state_dir=state_dir)
            created = create_topics(info.bootstrap_servers, settings)
            print("reusing running stack" if info.reused else "stack started", file=out)
            _print_info(info, out)
            print(
                f"topics  {len(topic_specs(settings))} ready, {len(created)} created "
                f"({settings.partitions} partitions)",
                file=out,
            )
            print("\nexport NUDGEFLOW_PROFILE=dev", file=out)
            if state_dir != Settings(profile="dev").state_dir.resolve():
                print(f"export NUDGEFLOW_STATE_DIR={state_dir}", file=out)
            return 0
        if args.action == "down":
            stopped = stack.down(state_dir)
            print("stack stopped" if stopped else f"no stack recorded in {state_dir}", file=out)
            return 0
        status = stack.status(state_dir)
        if status is None:
            print(f"no stack recorded in {state_dir}; run `nudgeflow dev up`", file=out)
            return 1
        _print_info(status, out)
        return 0 if status.healthy else 1
    except StackError as exc:
        print(f"nudgeflow dev {args.action}: {exc}", file=sys.stderr)
        return 1
