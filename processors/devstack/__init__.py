"""The embedded dev stack: an Apache Kafka broker and a redis-server (or, with
``redis_cluster=True``, a local Redis Cluster of 3 masters + 3 replicas) on free loopback ports.

The broker is a single-node KRaft Kafka (:mod:`.broker`) whose log directory lives in the state
dir and is wiped when a new stack starts. Both run as child processes in their own session (a
Ctrl-C in the terminal that started them does not kill them) and write their addresses to
``<state_dir>/stack.json``, which the ``dev`` settings profile reads. ``down`` only signals the
pids recorded there, and only after checking that each pid still runs the executable started.

The names below are the package's API (tests, benchmarks and the demo use them); the modules
are :mod:`.info`, :mod:`.stack`, :mod:`.processes`, :mod:`.health`, :mod:`.topics`,
:mod:`.broker`. The command is :mod:`processors.commands.dev`.
"""

from processors.devstack.health import broker_healthy, redis_healthy
from processors.devstack.info import RedisNode, StackError, StackInfo
from processors.devstack.stack import (
    BROKER_DIR,
    EmbeddedStack,
    embedded_stack,
    kafka_node,
    redis_binary,
)
from processors.devstack.topics import create_topics, topic_specs

__all__ = [
    "BROKER_DIR",
    "EmbeddedStack",
    "RedisNode",
    "StackError",
    "StackInfo",
    "broker_healthy",
    "create_topics",
    "embedded_stack",
    "kafka_node",
    "redis_binary",
    "redis_healthy",
    "topic_specs",
]
