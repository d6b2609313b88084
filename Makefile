# NudgeFlow developer tasks (GNU make). Works on a fresh Debian/Ubuntu machine with Python >= 3.11.
#   make test [PYTEST_ARGS=...]   unit + integration tests (embedded Apache Kafka + redis-server)
#   make test-long                multi-process end-to-end runs and compiled-build checks (CI runs them)
#   make chaos [PYTEST_ARGS=...]  the fault-injection suite (~18-20 min; docs/chaos.md)
#   make demo [DEMO_ARGS=...]     the whole pipeline on the embedded stack
#   make compiled                 the mypyc build of the engine in build/compiled (make bench uses it)
#   make lint | bench | bench-redis-memory | clean | distclean
#   make chromium | docs-images   headless browser for the report test; README pictures

SHELL := /bin/bash
.DEFAULT_GOAL := test

VENV := .venv
STAMP := $(VENV)/.installed
# First interpreter >= 3.11 found; override with `make PYTHON=/path/to/python3.12`.
ifndef PYTHON
PYTHON := $(firstword $(foreach p,python3.13 python3.12 python3.11 python3,$(if $(shell \
	command -v $(p) >/dev/null 2>&1 && \
	$(p) -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null && echo ok),$(p))) python3)
endif
SUDO_HINT := $(if $(filter 0,$(shell id -u)),,sudo )

PYTEST_ARGS ?=
DEMO_ARGS ?=
BENCH_ARGS ?=

.PHONY: .venv venv redis java kafka cc test test-long chaos demo lint bench bench-redis-memory compiled clean distclean

# Apache Kafka for the embedded stack: the version deploy/kafka/pom.xml pins, its runtime jars
# copied once by Maven into a per-user cache (override with NUDGEFLOW_KAFKA_LIBS).
KAFKA_VERSION := $(shell sed -n 's:.*<kafka.version>\(.*\)</kafka.version>.*:\1:p' deploy/kafka/pom.xml)
KAFKA_LIBS ?= $(or $(NUDGEFLOW_KAFKA_LIBS),$(or $(XDG_CACHE_HOME),$(HOME)/.cache)/nudgeflow/kafka-$(KAFKA_VERSION)/libs)
export NUDGEFLOW_KAFKA_LIBS := $(KAFKA_LIBS)

.venv venv: $(STAMP)

$(VENV)/bin/python:
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "$(PYTHON) not found; install Python >= 3.11 (e.g. $(SUDO_HINT)apt-get install -y python3 python3-venv)" >&2; exit 1; }
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { echo "NudgeFlow needs Python >= 3.11 but $(PYTHON) is $$($(PYTHON) -V 2>&1); run make PYTHON=/path/to/python3.11" >&2; exit 1; }
	@if ! $(PYTHON) -c 'import ensurepip, venv' >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    v=$$($(PYTHON) -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")'); \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv "python$$v-venv" \
	      || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv; \
	  else \
	    echo "$(PYTHON) cannot create virtualenvs; install it with: $(SUDO_HINT)apt-get install -y python3-venv" >&2; exit 1; \
	  fi; \
	fi
	$(PYTHON) -m venv $(VENV)

# Reinstall only when the dependency list changes.
$(STAMP): pyproject.toml | $(VENV)/bin/python
	$(VENV)/bin/python -m pip install -q -e '.[dev]'
	@touch $@

redis:
	@if ! command -v redis-server >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server; \
	  else \
	    echo "redis-server not found; install it with: sudo apt-get install -y redis-server" >&2; exit 1; \
	  fi; \
	fi

# Java (Kafka 4 needs 17+) and Maven, with apt when root.
java:
	@missing=""; \
	command -v java >/dev/null 2>&1 || missing="default-jre-headless"; \
	command -v mvn >/dev/null 2>&1 || missing="$$missing maven"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	  else \
	    echo "java/mvn not found; install them with: sudo apt-get install -y$$missing" >&2; exit 1; \
	  fi; \
	fi; \
	v=$$(java -XshowSettings:properties -version 2>&1 | sed -n 's/ *java.specification.version = //p'); \
	if [ "$${v%%.*}" -lt 17 ] 2>/dev/null; then \
	  echo "Apache Kafka $(KAFKA_VERSION) needs Java 17 or newer, found $$v; set JAVA_HOME to one" >&2; exit 1; \
	fi

kafka: $(KAFKA_LIBS)/kafka_2.13-$(KAFKA_VERSION).jar

$(KAFKA_LIBS)/kafka_2.13-$(KAFKA_VERSION).jar: deploy/kafka/pom.xml | java
	@echo "fetching Apache Kafka $(KAFKA_VERSION) jars into $(KAFKA_LIBS) (once)"
	@rm -rf "$(KAFKA_LIBS).tmp" && mkdir -p "$(KAFKA_LIBS).tmp"
	mvn -q -B -Dstyle.color=never -f deploy/kafka/pom.xml dependency:copy-dependencies -DincludeScope=runtime \
	  -DoutputDirectory="$(KAFKA_LIBS).tmp"
	@rm -rf "$(KAFKA_LIBS)" && mv "$(KAFKA_LIBS).tmp" "$(KAFKA_LIBS)" && touch "$@"

# The interpreted source; with a compiled build (make compiled, as .ci/run does first),
# tests/integration/test_compiled.py also runs the engine's checks on it.
test: .venv redis kafka chromium
	$(VENV)/bin/pytest -q -m "not chaos and not long" $(PYTEST_ARGS)

# The multi-process end-to-end runs make test leaves out (~2 min); CI runs them after make test.
test-long: .venv redis kafka
	$(VENV)/bin/pytest -q -m long $(PYTEST_ARGS)

# mypyc build of the hot modules (deploy/compile.py), never beside the source; pure Python stays
# the fallback. COMPILED_ENV runs a script on it (python -c or -m also need PYTHONSAFEPATH=1).
COMPILED := build/compiled
COMPILED_ENV := PYTHONPATH=$(CURDIR)/$(COMPILED)
compiled: .venv cc
	$(VENV)/bin/python deploy/compile.py --into $(COMPILED)

# A C compiler and the Python headers for mypyc, with apt when root.
cc:
	@if ! command -v cc >/dev/null 2>&1 || \
	  ! $(VENV)/bin/python -c 'import os, sysconfig, sys; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))'; then \
	  v=$$($(VENV)/bin/python -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")'); \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq gcc "python$$v-dev" \
	      || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq gcc python3-dev; \
	  else \
	    echo "a C compiler and the Python headers are needed for the compiled engine; install them with: $(SUDO_HINT)apt-get install -y gcc python$$v-dev" >&2; exit 1; \
	  fi; \
	fi

# The summary line (kills=… lost=… duplicates=…) is printed again as the very last line.
chaos: .venv redis kafka
	@summary=$$(mktemp); \
	NUDGEFLOW_CHAOS_SUMMARY=$$summary $(VENV)/bin/pytest -m chaos -s $(PYTEST_ARGS); rc=$$?; \
	if [ -s $$summary ]; then echo; grep '^kills=' $$summary; fi; rm -f $$summary; exit $$rc

demo: .venv redis kafka
	$(VENV)/bin/nudgeflow demo $(DEMO_ARGS)

lint: .venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy processors streams schemas bench deploy

# --- report in a browser: headless Chromium (Debian's package) and the README's pictures ---
.PHONY: chromium docs-images
CHROMIUM := $(firstword $(foreach b,chromium chromium-browser google-chrome,$(shell command -v $(b) 2>/dev/null)))

chromium:
	@if [ -z "$(CHROMIUM)" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; \
	  else \
	    echo "chromium not found; install it with: sudo apt-get install -y chromium" >&2; exit 1; \
	  fi; \
	fi

# The report of the default demo, photographed by headless Chromium (docs/images/report.png).
docs-images: .venv redis kafka chromium
	$(VENV)/bin/nudgeflow demo --out build/docs-demo $(DEMO_ARGS)
	$(VENV)/bin/python -m processors.browser build/docs-demo/report.html docs/images/report.png
# --- end of the browser block ---

# The quixstreams peer's own venv (bench/peers/requirements.txt: it pins an older
# confluent-kafka than NudgeFlow's); bench/trigger_throughput.py runs that peer with it.
PEERS_VENV := .venv-peers
PEERS_STAMP := $(PEERS_VENV)/.installed
$(PEERS_STAMP): bench/peers/requirements.txt | $(VENV)/bin/python
	$(PYTHON) -m venv $(PEERS_VENV)
	$(PEERS_VENV)/bin/python -m pip install -q -r bench/peers/requirements.txt
	@touch $@

bench: .venv $(PEERS_STAMP) redis kafka compiled
	$(COMPILED_ENV) NUDGEFLOW_BENCH_PEERS_PYTHON=$(CURDIR)/$(PEERS_VENV)/bin/python \
	  $(VENV)/bin/python bench/run.py $(BENCH_ARGS)

# Redis memory per contact on a single Redis and a local Redis Cluster (not in `make bench`:
# minutes); REDIS_MEMORY_ARGS="--contacts 1000000 --backend single" for the full size.
REDIS_MEMORY_ARGS ?= --contacts 100000
bench-redis-memory: .venv redis
	$(VENV)/bin/python bench/redis_memory.py $(REDIS_MEMORY_ARGS)

# Stops a running dev stack first so no broker/redis is left without its state file.
clean:
	-@[ -x $(VENV)/bin/nudgeflow ] && [ -f .nudgeflow/stack.json ] && $(VENV)/bin/nudgeflow dev down --state-dir .nudgeflow || true
	rm -rf .nudgeflow demo-out build .pytest_cache .mypy_cache .ruff_cache .hypothesis
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV) $(PEERS_VENV) *.egg-info
