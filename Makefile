# Simple Bank: the two commands a newcomer needs are `make run` and `make test`.
# Everything else here is a thin alias; the real work lives in Python (devstack/, scripts/).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
READY := $(VENV)/.ready

.PHONY: help venv gen check lint test test-unit test-faults up down run status logs tools web bench bench-customers bench-transfer bench-events bench-rpcs bench-sustained

help:
	@echo "make run      install what is missing, start the whole stack, stay in the foreground (Ctrl-C stops)"
	@echo "make test     install what is missing, start what the tests need, run them"
	@echo "make test-unit  the fast tier only: use cases against in-memory fakes, no stack (seconds)"
	@echo "make up/down  start the stack in the background / stop what it started"
	@echo "make status   what runs;  make logs C=<component>"
	@echo "make tools    build grpcurl, ghz and k6 into .stack/bin"
	@echo "make bench    benchmarks against the running stack (bench-rpcs, bench-customers, bench-transfer, bench-events)"
	@echo "make bench-sustained  transfers at stepped open-model rates, every consumer running: lags, backlog, headline"
	@echo "make gen      regenerate gen/ from proto/;  make check  buf lint + buf breaking + gen freshness"
	@echo "make web      build the customer web app (web/ into web/dist; make run and make test build it too)"

# The virtual environment inside the repo (git-ignored); gen/ and the repo root go on its path.
$(READY): requirements.txt
	@$(PYTHON) -m venv --help >/dev/null 2>&1 || (apt-get update -q && apt-get install -y -q python3-venv)
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -r requirements.txt
	printf '%s\n%s\n' "$(CURDIR)" "$(CURDIR)/gen" > "$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/simplebank.pth"
	touch $(READY)

venv: $(READY)

gen: $(READY)
	$(PY) scripts/gen_protos.py

check: $(READY)
	$(VENV)/bin/buf lint
	$(VENV)/bin/buf breaking --against '.git#branch=main'
	$(PY) scripts/gen_protos.py --check

lint: $(READY)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	$(PY) -m devstack.web check

test: $(READY) lint
	$(PY) -m pytest

# The fast tier (tests/unit): use cases against in-memory fakes of their stores; starts nothing.
# `make test` runs it too, with the stack tests.
test-unit: $(READY)
	$(PY) -m pytest -q tests/unit

# Only the fault tests (SIGKILL and restart of Kafka, Cassandra, svc_notify, the outbox relay;
# Mailpit down 30 s; holds in flight through Postgres and svc_transfer), against the stack
# `make up` started: about 4 minutes. `make test` runs them too.
test-faults: $(READY) up
	$(PY) -m pytest -q tests/test_events_faults.py tests/test_holds_faults.py

up: $(READY)
	$(PY) -m devstack up

down: $(READY)
	$(PY) -m devstack down

run: $(READY)
	$(PY) -m devstack run

web: $(READY)
	$(PY) -m devstack.web build

status: $(READY)
	$(PY) -m devstack status

# Benchmarks: against the running stack (`make up`), loopback only, bounded; JSON in perf/results/.
bench: bench-rpcs bench-customers bench-transfer bench-events

bench-rpcs: $(READY) tools
	$(PY) -m perf.bench_rpcs

bench-customers: $(READY) tools
	$(PY) -m perf.bench_customers

bench-transfer: $(READY) tools
	$(PY) -m perf.bench_transfer --whole-stack-first --pause-consumers

# Commit -> statement line and commit -> email in Mailpit, p50/p99, under a background load.
bench-events: $(READY)
	$(PY) -m perf.bench_events

# Open-model transfers at rising rates (k6), every consumer running: commit -> statement line and
# commit -> email p50/p99 and backlog growth per step, the highest rate kept up with (about 7 min).
bench-sustained: $(READY) tools
	$(PY) -m perf.bench_sustained

tools: $(READY)
	$(PY) -m devstack tools

logs: $(READY)
	$(PY) -m devstack logs $(C)
