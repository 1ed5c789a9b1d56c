# Every target installs what it needs first (Debian 12, as root), so each works from a clean clone.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=
BENCH_ARGS ?=
# make torture: the property tests (tests/unit/test_prop_*.py) under the Hypothesis profile "torture",
# EXAMPLES examples per test, from a random seed that is printed first; PROP_SEED=N replays that run.
EXAMPLES ?= 2000
PROP_SEED ?=
# make torture: chains of the differential fuzzer (tests/integration/test_chain_fuzz.py), SEEDS fresh
# random seeds, each printed; EKKO_FUZZ_SEED=S replays one, EKKO_FUZZ_EVENTS picks event kinds.
SEEDS ?= 20
# ... and SCHEDULES read-ahead schedules (tests/unit/test_reader_schedules.py), CUTS power cuts of the
# local store (tests/integration/test_store_crash.py; EKKO_CRASH_SEED=N replays one).
SCHEDULES ?= 50000
CUTS ?= 100

.PHONY: demo test unit bench torture deps deps-core lint clean

# Both build the C extensions (ekko_libvirt/format/_segcore.c, ekko_libvirt/_directio.c) in place
# (pip install -e: setup.py ext_modules), again whenever the .c is newer than the .so; so every target below runs the code of the checkout.
deps-core:
	bash scripts/install-deps.sh core

deps:
	bash scripts/install-deps.sh all

demo: deps-core
	$(PY) scripts/demo.py

# make test: lint first (a finding of ruff or mypy fails it), then every test
test: deps lint
	$(PY) -m pytest -q -p no:cacheprovider tests $(PYTEST_ARGS)

# make lint: ruff (ruff.toml) over the package and the hook, then mypy (mypy.ini) over the package
lint: deps-core
	$(VENV)/bin/ruff check ekko_libvirt hooks/qemu
	$(VENV)/bin/mypy

unit: deps-core
	$(PY) -m pytest -q -p no:cacheprovider tests/unit $(PYTEST_ARGS)

torture: deps
	seed=$(or $(PROP_SEED),$(shell od -An -N4 -tu4 /dev/urandom | tr -d ' ')); \
	echo "make torture: property tests, $(EXAMPLES) examples per test, PROP_SEED=$$seed"; \
	HYPOTHESIS_PROFILE=torture HYPOTHESIS_EXAMPLES=$(EXAMPLES) $(PY) -m pytest -q -p no:cacheprovider \
		tests/unit/test_prop_*.py --hypothesis-seed=$$seed $(PYTEST_ARGS)
	EKKO_FUZZ_SEEDS=$(SEEDS) $(PY) -m pytest -q -rA -p no:cacheprovider tests/integration/test_chain_fuzz.py $(PYTEST_ARGS)
	EKKO_READER_SCHEDULES=$(SCHEDULES) $(PY) -m pytest -q -p no:cacheprovider tests/unit/test_reader_schedules.py
	EKKO_CRASH_CUTS=$(CUTS) $(PY) -m pytest -q -p no:cacheprovider tests/integration/test_store_crash.py

bench: deps
	$(PY) bench/run.py $(BENCH_ARGS)

# make mutate [MODULE=segment] [MUTATE_ARGS="--rev HEAD --jobs 2"]: mutation testing (mutmut) of the
# core modules against the unit tests, one module at a time (scripts/mutate.py; docs/mutation.md).
.PHONY: mutate
mutate: deps-core
	nice -n 19 $(PY) scripts/mutate.py $(MODULE) $(MUTATE_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info demo-work ekko_libvirt/format/_segcore*.so ekko_libvirt/_directio*.so
