"""Apache Kafka for the embedded stack: a single-node KRaft broker from Maven artifacts.

``deploy/kafka/pom.xml`` pins the version; its runtime jars live in :func:`libs_dir` (fetched once
with Maven by ``make kafka`` or, failing that, by :func:`ensure_libs`). A :class:`KafkaNode` is one
combined broker + controller on loopback: it writes its ``server.properties`` and log4j2 config
into its directory, formats its storage once, and gives the ``java`` command line that runs it.
Starting, waiting and stopping the process is the caller's job (:mod:`processors.devstack.stack`).
"""

from __future__ import annotations

import base64
import os
import re
import shutil
import subprocess
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

from processors.settings import REPO_ROOT

POM = REPO_ROOT / "deploy" / "kafka" / "pom.xml"
INSTALL_HINT = "sudo apt-get install -y default-jre-headless maven"
LIBS_ENV = "NUDGEFLOW_KAFKA_LIBS"
HEAP_MB = 512
FETCH_TIMEOUT_S = 600.0
QUICK_JIT = ("-XX:TieredStopAtLevel=1",)
"""The client JIT only: the broker answers in ~3 s instead of ~7 s on two cores. Extra JVM
options (``-XX:TieredStopAtLevel=4`` for the full JIT) come from ``$NUDGEFLOW_KAFKA_JVM_OPTS``."""
JVM_OPTS_ENV = "NUDGEFLOW_KAFKA_JVM_OPTS"

# Settings a single-node test/dev broker needs; everything else is Kafka's default.
DEV_CONFIG = {
    "offsets.topic.replication.factor": "1",
    "offsets.topic.num.partitions": "1",
    "transaction.state.log.replication.factor": "1",
    "transaction.state.log.min.isr": "1",
    "transaction.state.log.num.partitions": "1",
    "share.coordinator.state.topic.replication.factor": "1",
    "share.coordinator.state.topic.min.isr": "1",
    "group.initial.rebalance.delay.ms": "0",
    "log.cleaner.dedupe.buffer.size": str(2 * 1024 * 1024),  # default 128 MiB of heap
    "log.cleaner.backoff.ms": "1000",  # compacted topics are cleaned within seconds
    "num.partitions": "1",
}

_LOG4J2 = """\
status = warn
appender.out.type = Console
appender.out.name = out
appender.out.layout.type = PatternLayout
appender.out.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = warn
rootLogger.appenderRef.out.ref = out
logger.started.name = kafka.server.KafkaRaftServer
logger.started.level = info
logger.cleaner.name = kafka.log.LogCleaner
logger.cleaner.level = info
"""


class KafkaSetupError(RuntimeError):
    """Java, Maven or the Kafka jars are missing or unusable; the message says what to do."""


def kafka_version(pom: Path = POM) -> str:
    """The Apache Kafka version that ``deploy/kafka/pom.xml`` pins."""
    found = re.search(r"<kafka\.version>\s*([^<\s]+)\s*</kafka\.version>", pom.read_text())
    if not found:
        raise KafkaSetupError(f"{pom} has no <kafka.version> property")
    return found.group(1)


def libs_dir(version: str | None = None) -> Path:
    """Where the broker's jars are: ``$NUDGEFLOW_KAFKA_LIBS`` or a per-version user cache."""
    if os.environ.get(LIBS_ENV):
        return Path(os.environ[LIBS_ENV])
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "nudgeflow" / f"kafka-{version or kafka_version()}" / "libs"


def _has_broker_jar(libs: Path, version: str) -> bool:
    return (libs / f"kafka_2.13-{version}.jar").is_file()


def ensure_libs(version: str | None = None) -> Path:
    """The jar directory, fetched with Maven first if it is not there yet."""
    version = version or kafka_version()
    libs = libs_dir(version)
    if _has_broker_jar(libs, version):
        return libs
    mvn = shutil.which("mvn")
    if mvn is None:
        raise KafkaSetupError(
            f"Apache Kafka {version} jars are not in {libs} and Maven is not installed; "
            f"run `make kafka` or: {INSTALL_HINT}"
        )
    libs.parent.mkdir(parents=True, exist_ok=True)
    # Into a fresh directory, renamed at the end: an interrupted fetch leaves no half set.
    staging = Path(tempfile.mkdtemp(prefix="libs-", dir=libs.parent))
    argv = [mvn, "-q", "-B", "-f", str(POM), "dependency:copy-dependencies"]
    argv += ["-DincludeScope=runtime", f"-DoutputDirectory={staging}"]
    argv += [f"-Dkafka.version={version}"]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=FETCH_TIMEOUT_S)
        if done.returncode != 0 or not _has_broker_jar(staging, version):
            tail = "\n".join((done.stdout + done.stderr).splitlines()[-15:])
            raise KafkaSetupError(f"fetching Apache Kafka {version} with Maven failed:\n{tail}")
        if not _has_broker_jar(libs, version):  # another process may have finished first
            shutil.rmtree(libs, ignore_errors=True)
            os.replace(staging, libs)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return libs


def java_binary() -> str:
    """``$JAVA_HOME/bin/java`` or ``java`` on PATH (Kafka 4 needs Java 17 or newer)."""
    home = os.environ.get("JAVA_HOME")
    if home and os.access(Path(home) / "bin" / "java", os.X_OK):
        return str(Path(home) / "bin" / "java")
    found = shutil.which("java")
    if not found:
        raise KafkaSetupError(f"java is not on PATH; install it with: {INSTALL_HINT}")
    return found


def new_cluster_id() -> str:
    """A KRaft cluster id: a UUID in URL-safe base64 without padding."""
    return base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")


@dataclass(frozen=True)
class KafkaNode:
    """One combined broker + controller listening on ``127.0.0.1:port``.

    Its files live in ``home``: ``server.properties``, ``log4j2.properties`` and ``data/`` (the
    log directory, which survives a restart of the node).
    """

    home: Path
    port: int
    controller_port: int
    libs: Path
    java: str
    heap_mb: int = HEAP_MB
    advertised_port: int | None = None  # clients reach it here (e.g. through a proxy)
    sasl_users: tuple[tuple[str, str], ...] = ()
    """With users, clients must log in (SASL_PLAINTEXT, mechanism PLAIN) as one of them."""

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.advertised_port or self.port}"

    @property
    def data_dir(self) -> Path:
        return self.home / "data"

    @property
    def config_path(self) -> Path:
        return self.home / "server.properties"

    def config(self) -> dict[str, str]:
        client = "SASL_PLAINTEXT" if self.sasl_users else "PLAINTEXT"
        controller = f"CONTROLLER://127.0.0.1:{self.controller_port}"
        config = {
            "process.roles": "broker,controller",
            "node.id": "1",
            "controller.quorum.voters": f"1@127.0.0.1:{self.controller_port}",
            "listeners": f"{client}://127.0.0.1:{self.port},{controller}",
            "advertised.listeners": f"{client}://{self.bootstrap}",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": client,
            "listener.security.protocol.map": f"{client}:{client},CONTROLLER:PLAINTEXT",
            "log.dirs": str(self.data_dir),
            **DEV_CONFIG,
        }
        if self.sasl_users:
            (broker_user, broker_password), *_ = self.sasl_users
            users = " ".join(f'user_{u}="{p}"' for u, p in self.sasl_users)
            jaas = "org.apache.kafka.common.security.plain.PlainLoginModule required "
            jaas += f'username="{broker_user}" password="{broker_password}" {users};'
            config["sasl.enabled.mechanisms"] = "PLAIN"
            config["sasl.mechanism.inter.broker.protocol"] = "PLAIN"
            config["listener.name.sasl_plaintext.plain.sasl.jaas.config"] = jaas
        return config

    def prepare(self) -> None:
        """Write the configs and give the log directory a formatted cluster unless it has one.

        Formatting starts a JVM (~2 s), so a formatted directory is kept once per Kafka version
        beside the jars and copied: every node formatted from it shares a cluster id, which is
        harmless for separate single-node clusters.
        """
        self.home.mkdir(parents=True, exist_ok=True)
        props = "".join(f"{k}={v}\n" for k, v in self.config().items())
        self.config_path.write_text(props)
        (self.home / "log4j2.properties").write_text(_LOG4J2)
        if not (self.data_dir / "meta.properties").exists():
            shutil.copytree(self._formatted_template(), self.data_dir, dirs_exist_ok=True)

    def _formatted_template(self) -> Path:
        template = self.libs.parent / "formatted-storage"
        if (template / "meta.properties").exists():
            return template
        staging = Path(tempfile.mkdtemp(prefix="formatting-", dir=self.libs.parent))
        try:
            config = {**self.config(), "log.dirs": str(staging / "data")}
            config_path = staging / "server.properties"
            config_path.write_text("".join(f"{k}={v}\n" for k, v in config.items()))
            argv = [self.java, "-Xmx256m", *QUICK_JIT, *self._log_opts()]
            argv += ["-cp", f"{self.libs}/*", "kafka.tools.StorageTool", "format"]
            argv += ["-t", new_cluster_id(), "-c", str(config_path)]
            done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
            if done.returncode != 0:
                tail = "\n".join((done.stdout + done.stderr).splitlines()[-15:])
                raise KafkaSetupError(f"formatting Kafka storage failed:\n{tail}")
            if not (template / "meta.properties").exists():  # another process may be first
                shutil.rmtree(template, ignore_errors=True)
                os.replace(staging / "data", template)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return template

    def argv(self) -> list[str]:
        """The command line of the broker process (SIGTERM stops it cleanly)."""
        heap = f"-Xmx{self.heap_mb}m"
        return [
            self.java,
            f"-Xms{min(self.heap_mb, 256)}m",
            heap,
            "-XX:+UseSerialGC",
            *QUICK_JIT,
            "-Djava.awt.headless=true",
            *self._log_opts(),
            *os.environ.get(JVM_OPTS_ENV, "").split(),
            "-cp",
            f"{self.libs}/*",
            "kafka.Kafka",
            str(self.config_path),
        ]

    def _log_opts(self) -> list[str]:
        return [f"-Dlog4j2.configurationFile={self.home / 'log4j2.properties'}"]
