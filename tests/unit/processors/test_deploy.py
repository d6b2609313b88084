"""Structural checks of everything under deploy/, docker-compose.yml and the Dockerfile.

Docker, Kubernetes and Prometheus are not available here, so these tests check what would break
silently: every file parses; services, images, ports, env and volumes are present and agree with
each other and with ``processors.settings``; every ``NUDGEFLOW_*`` variable is a real setting;
every PromQL expression (alert rules, dashboard panels) parses, names only metrics that
``processors.metrics`` registers and groups/filters only by labels those metrics have; the
topic-creation scripts create exactly the topics the code uses, with the right partitions and
compaction (run with a stub ``kafka-topics.sh``).
"""

from __future__ import annotations

import base64
import json
import re
import shlex
import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import promql_parser
import pytest
import redis
import yaml

from processors import metrics
from processors.core.campaign import load_campaigns
from processors.devstack import topic_specs
from processors.devstack.broker import kafka_version
from processors.settings import Settings
from streams.reader import offsets_group
from tests.support.own_redis import wait_until_answers

ROOT = Path(__file__).resolve().parents[3]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
SETTINGS = Settings()  # production defaults: what a container gets without overrides
TOPICS = {getattr(SETTINGS, name) for name in Settings.model_fields if name.startswith("topic_")}
EXTRA_LABELS = {"job", "instance", "le"}  # added by Prometheus / histograms


# ---------------------------------------------------------------- helpers


def interpolate(value: Any) -> Any:
    """docker compose ``${VAR:-default}`` / ``${VAR}`` with an empty environment."""
    if isinstance(value, str):
        return re.sub(r"\$\{(\w+)(?::?-([^}]*))?\}", lambda m: m.group(2) or "", value)
    if isinstance(value, list):
        return [interpolate(v) for v in value]
    if isinstance(value, dict):
        return {k: interpolate(v) for k, v in value.items()}
    return value


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return interpolate(yaml.safe_load((ROOT / "docker-compose.yml").read_text()))


@pytest.fixture(scope="module")
def k8s() -> dict[tuple[str, str], dict[str, Any]]:
    """Every manifest listed in kustomization.yaml, by (kind, name)."""
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    docs: dict[tuple[str, str], dict[str, Any]] = {}
    for resource in kustomization["resources"]:
        for doc in yaml.safe_load_all((K8S / resource).read_text()):
            if doc is None:
                continue
            assert {"apiVersion", "kind", "metadata"} <= set(doc), f"{resource}: {doc}"
            key = (doc["kind"], doc["metadata"]["name"])
            assert key not in docs, f"duplicate {key}"
            docs[key] = doc
    return docs


def env_map(env: Any) -> dict[str, str]:
    if isinstance(env, list):
        return dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in (env or {}).items()}


def assert_settings_env(env: dict[str, str], where: str) -> None:
    """Every NUDGEFLOW_* name is a real setting (pydantic ignores unknown ones silently)."""
    for name in env:
        if name.startswith("NUDGEFLOW_"):
            field = name.removeprefix("NUDGEFLOW_").lower()
            assert field in Settings.model_fields, f"{where}: {name} is not a setting"


def registry_labels() -> dict[str, set[str]]:
    """Exposed sample name -> label names, from the metric objects of processors.metrics."""
    out: dict[str, set[str]] = {}
    for obj in vars(metrics).values():
        if not hasattr(obj, "_labelnames") or not hasattr(obj, "_type"):
            continue
        labels = set(obj._labelnames)
        for name in metrics.exposed_names():
            if name == obj._name or name.startswith(obj._name + "_"):
                out.setdefault(name, set()).update(labels)
    return out


GRAFANA_VARS = {
    "$__rate_interval": "5m",
    "$__interval": "1m",
    "$__range": "6h",
    "$campaign": ".*",
}


def promql_check(expr: str, where: str) -> set[str]:
    """Parse ``expr``; check metric names and label names; return the metric names used."""
    for var, repl in GRAFANA_VARS.items():
        expr = expr.replace(var, repl)
    assert "$" not in expr, f"{where}: unknown Grafana variable in {expr!r}"
    try:
        ast = promql_parser.parse(expr)
    except ValueError as exc:
        pytest.fail(f"{where}: PromQL does not parse: {exc}\n{expr}")
    labels = registry_labels()
    exposed = metrics.exposed_names()
    names: set[str] = set()

    def selectors(node: Any) -> list[Any]:
        found: list[Any] = []
        promql_parser.walk(
            node, lambda n: found.append(n) if isinstance(n, promql_parser.VectorSelector) else None
        )
        return found

    def visit(node: Any) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            assert node.name, f"{where}: select metrics by name, not by {{__name__=...}}"
            names.add(node.name)
            if node.name in exposed:
                for m in node.matchers.matchers:
                    assert m.name in labels[node.name] | EXTRA_LABELS, (
                        f"{where}: {node.name} has no label {m.name!r}"
                    )
        if isinstance(node, promql_parser.AggregateExpr) and node.modifier is not None:
            if node.modifier.type == promql_parser.AggModifierType.By:
                for sel in selectors(node.expr):
                    if sel.name in exposed:
                        missing = set(node.modifier.labels) - labels[sel.name] - EXTRA_LABELS
                        assert not missing, f"{where}: {sel.name} has no label(s) {missing}"

    promql_parser.walk(ast, visit)
    unknown = names - exposed - {"up"}
    assert not unknown, f"{where}: metrics not in processors.metrics: {sorted(unknown)}"
    return names


def run_topic_script(script: str, env: dict[str, str], tmp_path: Path) -> dict[str, list[str]]:
    """Run a topic-creation script with a stub kafka-topics.sh; topic -> its arguments."""
    stub = tmp_path / "kafka-topics.sh"
    log = tmp_path / "calls.log"
    stub.write_text(f'#!/bin/bash\nprintf "%q " "$@" >> {log}\necho >> {log}\n')
    stub.chmod(0o755)
    script = script.replace("/opt/kafka/bin/kafka-topics.sh", str(stub))
    proc = subprocess.run(
        ["bash", "-ec", script], env={"PATH": "/usr/bin:/bin", **env}, capture_output=True
    )
    assert proc.returncode == 0, proc.stderr.decode()
    calls: dict[str, list[str]] = {}
    for line in log.read_text().splitlines():
        args = shlex.split(line)
        if "--create" in args:
            topic = args[args.index("--topic") + 1]
            assert topic not in calls, f"{topic} created twice"
            calls[topic] = args
    return calls


def check_topic_calls(calls: dict[str, list[str]], partitions: str, replication: str) -> None:
    assert set(calls) == TOPICS, f"created {sorted(calls)}, the code uses {sorted(TOPICS)}"
    specs = topic_specs(SETTINGS)
    for topic, args in calls.items():
        assert args[args.index("--partitions") + 1] == partitions, topic
        assert args[args.index("--replication-factor") + 1] == replication, topic
        assert "--if-not-exists" in args, topic
        configs = dict(args[i + 1].split("=", 1) for i, a in enumerate(args) if a == "--config")
        for key, value in specs.get(topic, {}).items():
            assert configs.get(key) == value, f"{topic}: {key} must be {value}"
        compacted = configs.get("cleanup.policy") == "compact"
        assert compacted == (topic == SETTINGS.topic_contacts), topic
        if not compacted:
            assert int(configs["retention.ms"]) >= 3_600_000, f"{topic}: no retention set"


# ---------------------------------------------------------------- docker compose


def test_compose_services_images_and_kraft(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert {
        "kafka",
        "topics",
        "schema-registry",
        "redis",
        "worker",
        "dispatcher",
        "webhooks",
        "prometheus",
        "grafana",
    } <= set(services)
    kafka = services["kafka"]
    assert kafka["image"] == f"apache/kafka:{kafka_version()}"  # the version make test ran on
    assert services["topics"]["image"] == kafka["image"]
    assert services["schema-registry"]["image"].startswith("confluentinc/cp-schema-registry:")
    assert services["redis"]["image"].startswith("redis:")
    assert services["prometheus"]["image"].startswith("prom/prometheus:")
    assert services["grafana"]["image"].startswith("grafana/grafana:")
    env = env_map(kafka["environment"])
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    assert not any("ZOOKEEPER" in k for k in env), "KRaft mode has no ZooKeeper"
    assert env["KAFKA_CONTROLLER_QUORUM_VOTERS"] == f"{env['KAFKA_NODE_ID']}@kafka:9093"
    cluster_id = env["CLUSTER_ID"].split()[0]
    assert len(base64.urlsafe_b64decode(cluster_id + "==")) == 16, "CLUSTER_ID: base64url UUID"
    listeners = dict(item.split("://", 1) for item in env["KAFKA_ADVERTISED_LISTENERS"].split(","))
    # Host tools use the production defaults (localhost:9092 and the registry on :8081).
    assert listeners["EXTERNAL"] == SETTINGS.bootstrap_servers
    assert "9092:9092" in kafka["ports"]
    assert "8081:8081" in services["schema-registry"]["ports"]
    assert SETTINGS.schema_registry_url == "http://localhost:8081"
    assert env["KAFKA_AUTO_CREATE_TOPICS_ENABLE"] == "false"
    assert "kafka-data:/var/lib/kafka/data" in kafka["volumes"]
    assert env["KAFKA_LOG_DIRS"] == "/var/lib/kafka/data"
    internal = listeners["INTERNAL"]
    registry_env = env_map(services["schema-registry"]["environment"])
    assert registry_env["SCHEMA_REGISTRY_KAFKASTORE_BOOTSTRAP_SERVERS"] == f"PLAINTEXT://{internal}"
    for name in ("kafka", "schema-registry", "redis"):
        assert "test" in services[name]["healthcheck"], name


def test_compose_nudgeflow_services(compose: dict[str, Any]) -> None:
    services = compose["services"]
    internal = dict(
        item.split("://", 1)
        for item in env_map(services["kafka"]["environment"])["KAFKA_ADVERTISED_LISTENERS"].split(
            ","
        )
    )["INTERNAL"]
    for name, command in (
        ("worker", "worker"),
        ("dispatcher", "dispatcher"),
        ("webhooks", "webhooks"),
    ):
        svc = services[name]
        assert svc["build"] == "."
        assert svc["command"] == ["nudgeflow", command]
        env = env_map(svc["environment"])
        assert_settings_env(env, f"compose {name}")
        assert env["NUDGEFLOW_BOOTSTRAP_SERVERS"] == internal
        assert env["NUDGEFLOW_SCHEMA_REGISTRY_URL"] == "http://schema-registry:8081"
        assert env["NUDGEFLOW_REDIS_URL"].startswith("redis://redis:6379/")
        assert env["NUDGEFLOW_METRICS_PORT"] == "9100"
        assert env["NUDGEFLOW_PARTITIONS"] == "6"
        assert svc["depends_on"]["topics"]["condition"] == "service_completed_successfully"
        mounts = [v for v in svc["volumes"] if isinstance(v, str) and ":" in v]
        campaigns = [m for m in mounts if m.endswith(":/etc/nudgeflow/campaigns.yaml:ro")]
        assert campaigns, f"{name} does not mount the campaign file"
        assert (ROOT / campaigns[0].split(":")[0]).is_file()
        assert env["NUDGEFLOW_CAMPAIGNS_FILE"] == "/etc/nudgeflow/campaigns.yaml"
    worker = services["worker"]
    assert int(worker["deploy"]["replicas"]) >= 2
    assert int(services["dispatcher"]["deploy"]["replicas"]) >= 2
    worker_env = env_map(worker["environment"])
    assert worker_env["NUDGEFLOW_WORKER_STORE"] == "rocksdb://"
    # RocksDB lives under FAUST_DATADIR, which must be on a per-replica volume.
    assert any(worker_env["FAUST_DATADIR"].startswith(v) for v in worker["volumes"] if ":" not in v)
    dispatcher_env = env_map(services["dispatcher"]["environment"])
    assert dispatcher_env["NUDGEFLOW_GATEWAY"] == "outbox"  # works without credentials
    assert "8080:8080" in services["webhooks"]["ports"]
    assert env_map(services["webhooks"]["environment"])["NUDGEFLOW_WEBHOOK_PORT"] == "8080"
    declared = set(compose["volumes"])
    for svc in services.values():
        for v in svc.get("volumes", []):
            source = v.split(":")[0]
            if ":" in v and not source.startswith((".", "/")):
                assert source in declared, f"volume {source} is not declared"
            elif source.startswith("."):
                assert (ROOT / source).exists(), f"{v}: {source} does not exist"


def test_compose_topics_job_creates_every_topic(compose: dict[str, Any], tmp_path: Path) -> None:
    job = compose["services"]["topics"]
    assert job["depends_on"]["kafka"]["condition"] == "service_healthy"
    assert job["entrypoint"][0] == "/bin/bash"
    # Compose turns $$ into $ before the shell sees the script.
    script = job["command"][0].replace("$$", "$")
    env = env_map(job["environment"])
    calls = run_topic_script(script, env, tmp_path)
    check_topic_calls(calls, partitions="6", replication="1")


# ---------------------------------------------------------------- Dockerfile


def test_dockerfile_and_dockerignore() -> None:
    text = (ROOT / "Dockerfile").read_text()
    lines = [
        ln.strip()
        for ln in text.replace("\\\n", " ").splitlines()
        if ln.strip()[:1] not in ("#", "")
    ]
    froms = [ln for ln in lines if ln.startswith("FROM ")]
    assert froms and all(ln.split()[1].startswith("python:3.11") for ln in froms)
    copies = " ".join(ln for ln in lines if ln.startswith("COPY "))
    for path in ("pyproject.toml", "README.md", "processors", "streams", "schemas"):
        assert path in copies, f"the image does not get {path}"
        assert (ROOT / path).exists()
    user = [ln for ln in lines if ln.startswith("USER ")][-1]
    assert user.split()[1].split(":")[0] not in ("root", "0")
    assert "9100" in " ".join(ln for ln in lines if ln.startswith("EXPOSE "))
    env_line = " ".join(ln.removeprefix("ENV ") for ln in lines if ln.startswith("ENV "))
    env = dict(re.findall(r"(\w+)=(\S+)", env_line))
    assert_settings_env(env, "Dockerfile")
    assert env["NUDGEFLOW_WORKER_STORE"] == "rocksdb://"
    assert env["FAUST_DATADIR"].startswith("/var/lib/nudgeflow")
    assert 'CMD ["nudgeflow"' in text
    ignored = {ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()}
    assert {".venv", ".git"} <= ignored
    assert not ignored & {"processors", "streams", "schemas", "examples", "pyproject.toml"}


# ---------------------------------------------------------------- Kubernetes


def containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    return doc["spec"]["template"]["spec"]["containers"]


def test_k8s_workloads(k8s: dict[tuple[str, str], dict[str, Any]]) -> None:
    config = k8s[("ConfigMap", "nudgeflow-env")]["data"]
    assert_settings_env(config, "configmap")
    secret = k8s[("Secret", "nudgeflow-vonage")]
    assert set(secret["stringData"].values()) == {"replace-me"}, "no real secret in the repo"
    workloads = {
        "worker": k8s[("StatefulSet", "nudgeflow-worker")],
        "dispatcher": k8s[("Deployment", "nudgeflow-dispatcher")],
        "webhooks": k8s[("Deployment", "nudgeflow-webhooks")],
    }
    for role, doc in workloads.items():
        spec = doc["spec"]
        selector = spec["selector"]["matchLabels"]
        assert selector.items() <= spec["template"]["metadata"]["labels"].items(), role
        pod = spec["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        (c,) = containers(doc)
        assert c["image"] == "nudgeflow"
        assert c["command"] == ["nudgeflow", role]
        assert {"configMapRef": {"name": "nudgeflow-env"}} in c["envFrom"]
        assert_settings_env({e["name"]: "" for e in c.get("env", [])}, role)
        for e in c.get("env", []):
            ref = e.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                assert ref["name"] == "nudgeflow-vonage" and ref["key"] in secret["stringData"]
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        for probe in ("livenessProbe", "readinessProbe"):
            get = c[probe]["httpGet"]
            assert get["port"] in ports, f"{role} {probe} port"
        assert c["resources"]["requests"]["cpu"] and c["resources"]["requests"]["memory"]
        assert c["resources"]["limits"]["memory"]
        mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
        volumes = {v["name"] for v in pod.get("volumes", [])}
        volumes |= {t["metadata"]["name"] for t in spec.get("volumeClaimTemplates", [])}
        assert set(mounts.values()) <= volumes, role
        assert mounts["/etc/nudgeflow"] == "campaigns"
        if c["securityContext"].get("readOnlyRootFilesystem"):
            assert "/tmp" in mounts, f"{role}: read-only root needs a writable /tmp"
    worker = workloads["worker"]
    (wc,) = containers(worker)
    wenv = {e["name"]: e.get("value") for e in wc["env"]}
    assert wenv["NUDGEFLOW_WORKER_STORE"] == "rocksdb://"
    state_mount = next(m for m in wc["volumeMounts"] if m["name"] == "state")["mountPath"]
    assert wenv["FAUST_DATADIR"].startswith(state_mount), "RocksDB must be on the claimed volume"
    (claim,) = worker["spec"]["volumeClaimTemplates"]
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert worker["spec"]["template"]["spec"]["securityContext"]["fsGroup"] == 10001
    assert containers(workloads["worker"])[0]["ports"][0]["containerPort"] == int(
        config["NUDGEFLOW_METRICS_PORT"]
    )
    webhook_port = containers(workloads["webhooks"])[0]["ports"][0]["containerPort"]
    assert webhook_port == int(config["NUDGEFLOW_WEBHOOK_PORT"])
    # Services select the pods they front.
    for name in ("nudgeflow-worker", "nudgeflow-webhooks"):
        svc = k8s[("Service", name)]
        pod_labels = next(
            d["spec"]["template"]["metadata"]["labels"]
            for (kind, n), d in k8s.items()
            if n == name and kind in ("Deployment", "StatefulSet")
        )
        assert svc["spec"]["selector"].items() <= pod_labels.items()
    assert worker["spec"]["serviceName"] == "nudgeflow-worker"


def free_cluster_port() -> int:
    """A free loopback port whose cluster bus port (+10000) is free too."""
    while True:
        with socket.socket() as s, socket.socket() as bus:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
            if port + 10_000 > 65_535:
                continue
            try:
                bus.bind(("127.0.0.1", port + 10_000))
            except OSError:
                continue
            return port


def redis_cluster_manifests() -> dict[tuple[str, str], dict[str, Any]]:
    kustomization = yaml.safe_load((K8S / "redis-cluster" / "kustomization.yaml").read_text())
    docs: dict[tuple[str, str], dict[str, Any]] = {}
    for resource in kustomization["resources"]:
        for doc in yaml.safe_load_all((K8S / "redis-cluster" / resource).read_text()):
            docs[(doc["kind"], doc["metadata"]["name"])] = doc
    return docs


def test_k8s_redis_cluster_is_formed_and_found_by_nudgeflow(
    k8s: dict[tuple[str, str], dict[str, Any]],
) -> None:
    """The optional in-cluster Redis Cluster: 3 masters + 3 replicas, and the URL NudgeFlow's
    pods read names its StatefulSet's pods through the headless Service."""
    docs = redis_cluster_manifests()
    sts = docs[("StatefulSet", "redis-cluster")]
    svc = docs[("Service", "redis-cluster")]
    assert sts["spec"]["serviceName"] == "redis-cluster" and svc["spec"]["clusterIP"] == "None"
    assert svc["spec"]["selector"].items() <= sts["spec"]["template"]["metadata"]["labels"].items()
    job_script = containers(docs[("Job", "redis-cluster-create")])[0]["args"][0]
    replicas_per_master = int(re.search(r"--cluster-replicas (\d+)", job_script)[1])  # type: ignore[index]
    (job,) = containers(docs[("Job", "redis-cluster-create")])
    nodes = int(next(e["value"] for e in job["env"] if e["name"] == "NODES"))
    assert nodes == sts["spec"]["replicas"]
    assert nodes // (1 + replicas_per_master) >= 3, "a Redis Cluster needs 3 masters"
    secret = docs[("Secret", "nudgeflow-redis")]["stringData"]
    url = secret["NUDGEFLOW_REDIS_URL"]
    assert url.startswith("redis+cluster://"), url
    seeds = [h.split(":")[0] for h in url.rsplit("@", 1)[-1].split(",")]
    namespace = yaml.safe_load((K8S / "redis-cluster" / "kustomization.yaml").read_text())[
        "namespace"
    ]
    assert len(seeds) >= 2, "one seed down must not stop a process from starting"
    for seed in seeds:  # pods of the StatefulSet, through its headless Service
        pod, svc_name, ns, suffix = seed.split(".")
        assert pod.rsplit("-", 1)[0] == "redis-cluster" and int(pod.rsplit("-", 1)[1]) < nodes
        assert (svc_name, ns, suffix) == ("redis-cluster", namespace, "svc")
    assert secret["REDIS_PASSWORD"] in url
    for kind, name in [("StatefulSet", "nudgeflow-worker"), ("Deployment", "nudgeflow-dispatcher"),
                       ("Deployment", "nudgeflow-webhooks")]:  # fmt: skip
        env_from = containers(k8s[(kind, name)])[0]["envFrom"]
        refs = [e.get("configMapRef", e.get("secretRef"))["name"] for e in env_from]
        assert refs == ["nudgeflow-env", "nudgeflow-redis"], f"{name}: the Secret must win"
        assert env_from[1]["secretRef"]["optional"] is True


def test_k8s_redis_cluster_config_starts_a_cluster_node(tmp_path: Path) -> None:
    """The ConfigMap's redis.conf plus the pod's arguments start a real redis-server in cluster
    mode (an unknown or misspelt directive makes redis-server refuse to start)."""
    docs = redis_cluster_manifests()
    conf = docs[("ConfigMap", "redis-cluster")]["data"]["redis.conf"]
    (c,) = containers(docs[("StatefulSet", "redis-cluster")])
    args = shlex.split(c["args"][0].replace("exec ", "", 1))
    port = free_cluster_port()
    conf = conf.replace("port 6379", f"port {port}").replace("/data", str(tmp_path))
    (tmp_path / "redis.conf").write_text(conf + "bind 127.0.0.1\n")
    env = {"POD_IP": "127.0.0.1", "POD_NAME": "redis-cluster-0", "POD_NAMESPACE": "nudgeflow",
           "REDIS_PASSWORD": "pw"}  # fmt: skip
    argv = [shutil.which("redis-server") or "redis-server", str(tmp_path / "redis.conf")]
    argv += [re.sub(r"\$(\w+)", lambda m: env[m[1]], a) for a in args[2:]]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = redis.Redis(port=port, password="pw", socket_timeout=2)
    try:
        wait_until_answers(client, proc)
        got = lambda key: client.config_get(key)[key]  # noqa: E731
        assert got("cluster-enabled") == "yes"
        assert got("cluster-preferred-endpoint-type") == "hostname"
        assert got("cluster-announce-hostname") == "redis-cluster-0.redis-cluster.nudgeflow.svc"
        assert got("appendonly") == "yes" and got("masterauth") == "pw"
    finally:
        client.close()
        proc.terminate()
        proc.communicate(timeout=10)


def test_k8s_keda_pdb_and_campaigns(k8s: dict[tuple[str, str], dict[str, Any]]) -> None:
    config = k8s[("ConfigMap", "nudgeflow-env")]["data"]
    partitions = int(config["NUDGEFLOW_PARTITIONS"])
    expected = {
        "nudgeflow-worker": (
            "StatefulSet",
            offsets_group(config["NUDGEFLOW_WORKER_ID"]),
            SETTINGS.topic_clickstream,
        ),
        "nudgeflow-dispatcher": (
            "Deployment",
            config["NUDGEFLOW_DISPATCHER_GROUP"],
            SETTINGS.topic_decisions,
        ),
    }
    scaled = {n: d for (k, n), d in k8s.items() if k == "ScaledObject"}
    assert set(scaled) == set(expected)
    for name, (kind, group, topic) in expected.items():
        spec = scaled[name]["spec"]
        target = spec["scaleTargetRef"]
        assert (target["kind"], target["name"]) == (kind, name)
        assert (kind, name) in k8s
        assert spec["maxReplicaCount"] == partitions, "max replicas = partitions"
        assert spec["minReplicaCount"] >= 1, "live timers and deferred sends need a consumer"
        (trigger,) = spec["triggers"]
        assert trigger["type"] == "kafka"
        meta = trigger["metadata"]
        assert meta["bootstrapServers"] == config["NUDGEFLOW_BOOTSTRAP_SERVERS"]
        assert (meta["consumerGroup"], meta["topic"]) == (group, topic)
        assert int(meta["lagThreshold"]) > 0
    assert config["NUDGEFLOW_WORKER_ID"] == SETTINGS.worker_id
    assert config["NUDGEFLOW_DISPATCHER_GROUP"] == SETTINGS.dispatcher_group
    pdbs = {n: d for (k, n), d in k8s.items() if k == "PodDisruptionBudget"}
    assert set(pdbs) == {"nudgeflow-worker", "nudgeflow-dispatcher", "nudgeflow-webhooks"}
    for name, pdb in pdbs.items():
        workload = next(d for (k, n), d in k8s.items() if n == name and k != "PodDisruptionBudget"
                        and k in ("Deployment", "StatefulSet"))  # fmt: skip
        labels = workload["spec"]["template"]["metadata"]["labels"]
        assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    # The campaign ConfigMap is mounted where NUDGEFLOW_CAMPAIGNS_FILE points.
    path = Path(config["NUDGEFLOW_CAMPAIGNS_FILE"])
    assert path.parent == Path("/etc/nudgeflow")
    assert path.name in k8s[("ConfigMap", "nudgeflow-campaigns")]["data"]


def test_k8s_campaigns_configmap_is_a_valid_campaign_file(
    k8s: dict[tuple[str, str], dict[str, Any]], tmp_path: Path
) -> None:
    text = k8s[("ConfigMap", "nudgeflow-campaigns")]["data"]["campaigns.yaml"]
    (tmp_path / "campaigns.yaml").write_text(text)
    assert load_campaigns(tmp_path / "campaigns.yaml").enabled


def test_k8s_topics_job(k8s: dict[tuple[str, str], dict[str, Any]], tmp_path: Path) -> None:
    job = k8s[("Job", "nudgeflow-topics")]
    (c,) = job["spec"]["template"]["spec"]["containers"]
    assert c["image"] == f"apache/kafka:{kafka_version()}"
    config = k8s[("ConfigMap", "nudgeflow-env")]["data"]
    assert {"configMapRef": {"name": "nudgeflow-env"}} in c["envFrom"]
    calls = run_topic_script(c["args"][0], dict(config), tmp_path)
    check_topic_calls(
        calls,
        partitions=config["NUDGEFLOW_PARTITIONS"],
        replication=config["NUDGEFLOW_REPLICATION_FACTOR"],
    )


# ---------------------------------------------------------------- Prometheus and Grafana


def alert_rules() -> Iterator[dict[str, Any]]:
    doc = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    for group in doc["groups"]:
        assert group["name"] and group["rules"]
        yield from group["rules"]


def test_prometheus_scrapes_every_service(compose: dict[str, Any]) -> None:
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    prom = compose["services"]["prometheus"]
    mounts = dict(v.split(":")[:2] for v in prom["volumes"] if v.startswith("./"))
    by_target = {target: (ROOT / src) for src, target in mounts.items()}
    assert by_target["/etc/prometheus/prometheus.yml"].resolve() == (
        DEPLOY / "prometheus" / "prometheus.yml"
    )
    for rule_file in config["rule_files"]:
        assert by_target[rule_file].is_file(), rule_file
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    ports = {"worker": 9100, "dispatcher": 9100, "webhooks": 8080}
    for service, port in ports.items():
        (sd,) = jobs[f"nudgeflow-{service}"]["dns_sd_configs"]
        assert sd["names"] == [service] and sd["type"] == "A" and sd["port"] == port
        assert service in compose["services"]


def test_alert_rules_cover_the_issue_and_use_registered_metrics() -> None:
    used: dict[str, set[str]] = {}
    for rule in alert_rules():
        name = rule["alert"]
        assert re.fullmatch(r"NudgeFlow[A-Za-z]+", name)
        assert rule["labels"]["severity"] in {"warning", "critical"}
        assert rule["annotations"]["summary"]
        assert re.fullmatch(r"\d+[smh]", rule["for"])
        used[name] = promql_check(rule["expr"], f"alert {name}")
    needs = {
        "nudgeflow_consumer_lag",  # lag growing
        "nudgeflow_sms_failed_total",  # gateway failures
        "nudgeflow_campaign_enabled",  # no sends for an enabled campaign
        "nudgeflow_opt_outs_total",  # opt-out spike
        "nudgeflow_timer_lateness_seconds_bucket",  # timer lateness
    }
    assert needs <= set().union(*used.values())
    no_sends = used["NudgeFlowNoSendsForEnabledCampaign"]
    assert {"nudgeflow_campaign_enabled", "nudgeflow_sms_sent_total"} <= no_sends


def test_grafana_dashboard_and_provisioning(compose: dict[str, Any]) -> None:
    path = DEPLOY / "grafana" / "dashboards" / "nudgeflow.json"
    dashboard = json.loads(path.read_text())
    assert dashboard["uid"] and dashboard["title"] == "NudgeFlow"
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert {"datasource", "campaign"} <= variables
    used: set[str] = set()
    occupied: set[tuple[int, int]] = set()
    ids: set[int] = set()
    for panel in dashboard["panels"]:
        assert panel["id"] not in ids
        ids.add(panel["id"])
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24
        cells = {
            (x, y)
            for x in range(pos["x"], pos["x"] + pos["w"])
            for y in range(pos["y"], pos["y"] + pos["h"])
        }
        assert not cells & occupied, f"panel {panel['title']!r} overlaps another"
        occupied |= cells
        if panel["type"] == "row":
            continue
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            used |= promql_check(target["expr"], f"panel {panel['title']!r}")
        for q in (v for v in dashboard["templating"]["list"] if v["type"] == "query"):
            query = q["query"]["query"] if isinstance(q["query"], dict) else q["query"]
            metric = re.fullmatch(r"label_values\((\w+), *(\w+)\)", query)
            assert metric and metric.group(1) in metrics.exposed_names()
            assert metric.group(2) in registry_labels()[metric.group(1)]
    assert {
        "nudgeflow_events_consumed_total",  # throughput
        "nudgeflow_event_to_send_seconds_bucket",  # event -> send latency quantiles
        "nudgeflow_sms_sent_total",  # sends
        "nudgeflow_sms_suppressed_total",  # suppressions by reason
        "nudgeflow_sms_deferred",  # deferred backlog
        "nudgeflow_gateway_throttled_total",  # gateway throttling
        "nudgeflow_consumer_lag",  # consumer lag
        "nudgeflow_conversions_total",  # conversions (and rate)
    } <= used
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert any("nudgeflow_conversions_total" in e and "/" in e for e in exprs), "conversion rate"
    assert any("histogram_quantile(0.95" in e and "event_to_send" in e for e in exprs)
    # Provisioning points at the compose services and mounts.
    grafana = compose["services"]["grafana"]
    mounts = dict(v.split(":")[:2] for v in grafana["volumes"] if v.startswith("./"))
    assert (ROOT / [s for s, t in mounts.items() if t == "/etc/grafana/provisioning"][0]).is_dir()
    ds = yaml.safe_load(
        (DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text()
    )
    (source,) = ds["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    assert "9090:9090" in compose["services"]["prometheus"]["ports"]
    providers = yaml.safe_load(
        (DEPLOY / "grafana" / "provisioning" / "dashboards" / "nudgeflow.yml").read_text()
    )
    (provider,) = providers["providers"]
    dash_dir = provider["options"]["path"]
    assert mounts[f"./{path.parent.relative_to(ROOT)}"] == dash_dir
