# The two commands a newcomer needs: `make demo` and `make test`. Both install what they use
# into .venv (Python 3.10+; set PYTHON to choose the interpreter).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
PROTO_VENV ?= .venv-proto

.PHONY: all install demo test test-unit typecheck bench docs chaos proto check-protobuf clean

all: test

$(VENV)/.installed-%: setup.cfg setup.py
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -e '.[$*]'
	@touch $@

install: $(VENV)/.installed-test

demo: $(VENV)/.installed-server
	$(PY) examples/demo.py

# The suite runs on PYTEST_WORKERS processes (pytest-xdist), each with its own etcd; a test
# file stays on one worker (its fixtures are per file). PYTEST_WORKERS=0 runs it in this process.
PYTEST_WORKERS ?= 2
test: $(VENV)/.installed-test
	$(PY) -m pytest -n $(PYTEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

test-unit: $(VENV)/.installed-test
	$(PY) -m pytest -m unit $(PYTEST_ARGS)

# mypy --strict, configured in setup.cfg [mypy] (the generated etcdcron/_pb excluded).
typecheck: $(VENV)/.installed-test
	$(PY) -m mypy --strict etcdcron

# The benchmark suite of issue 9 (bench/README.md): its own etcd on disk, about 25 minutes; it
# writes bench/RESULTS.md. make bench BENCH_ARGS=--quick is a 2-minute smoke run; other options:
# --only ROW, --shm, --profile (python bench/run.py --help).
BENCH_ARGS ?=
bench: $(VENV)/.installed-bench
	$(PY) bench/run.py $(BENCH_ARGS)

# The Sphinx docs, warnings as errors, into build/docs/html (tests/test_docs.py builds them too).
docs: $(VENV)/.installed-docs
	$(PY) -m sphinx -W --keep-going -q -b html docs build/docs/html
	@echo "docs: build/docs/html/index.html"

# One chaos run (tests/chaos): a 3-member etcd, replica processes behind fault proxies, seeded
# overlapping faults, and the audit of every trigger; exits 0 only if nothing was lost.
# make chaos CHAOS_SECONDS=120 CHAOS_SEED=1234 (a random seed by default; it is printed).
CHAOS_SECONDS ?= 120
CHAOS_SEED ?=
chaos: $(VENV)/.installed-test
	$(PY) -m tests.chaos --seconds $(CHAOS_SECONDS) $(if $(CHAOS_SEED),--seed $(CHAOS_SEED)) $(CHAOS_ARGS)

# Regenerates etcdcron/_pb from protos/ with the pinned protoc of grpcio-tools (its output needs
# protobuf >= 5.29 at run time, the oldest the package declares).
proto:
	@test -x $(PROTO_VENV)/bin/python || $(PYTHON) -m venv $(PROTO_VENV)
	$(PROTO_VENV)/bin/python -m pip --disable-pip-version-check -q install 'grpcio-tools==1.71.0'
	$(PROTO_VENV)/bin/python -m grpc_tools.protoc -Iprotos --python_out=. --pyi_out=. \
		protos/etcdcron/_pb/api.proto protos/etcdcron/_pb/stored.proto

clean:
	rm -rf $(VENV) $(PROTO_VENV) build dist *.egg-info
