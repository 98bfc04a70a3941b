# tinyplm: `make demo` (set up + whole pipeline on the demo corpus), `make test` (the whole test suite, as CI
# runs it), `make test-fast` (the inner loop: the tests not marked `slow`), `make test-random [SEED=N]`
# (the whole suite in a shuffled order).
VENV ?= .venv
PY := $(VENV)/bin/python
export DAGSTER_HOME ?= $(CURDIR)/.dagster
export DAGSTER_DISABLE_TELEMETRY := 1
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install demo test test-fast test-random browser dagster-home clean

# torch first and exactly pinned: here pip finds a local CPU wheel for it (a looser range would pull
# the multi-GB CUDA build); in the docker image the same line installs the CUDA build on purpose.
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet torch==2.13.0
	$(VENV)/bin/pip install --quiet -e '.[test,deploy]'
	touch $@

install: $(VENV)/.installed

# The instance lives in .dagster/ and reads the repository's dagster.yaml (pools, telemetry).
dagster-home:
	mkdir -p $(DAGSTER_HOME)
	ln -sf $(CURDIR)/dagster.yaml $(DAGSTER_HOME)/dagster.yaml

demo: install dagster-home
	$(VENV)/bin/dagster job execute -m tinyplm_assets.definitions -j pretrain_all -c configs/demo.yaml
	@$(PY) -m tinyplm_assets.locate bert_stage2_jawiki

# tests/test_ui_browser.py drives Debian's chromium: installed here when missing and we are root,
# otherwise a hint (that test then skips; with CI set it fails instead).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium; \
	  else \
	    echo "chromium is missing: 'sudo apt-get install chromium' runs the browser test (skipped without it)"; \
	  fi; }

# Two xdist workers, one per core. --dist loadfile keeps each module on one worker (its module fixtures
# are built once) and the tests of the shared demo materialisation together (tests/conftest.py);
# --no-loadscope-reorder keeps conftest's order, heaviest groups first. Measured unloaded with the venv
# in place: the tests not marked slow take 69 s on 2 workers, 101 s on one.
XDIST := -n 2 --dist loadfile --no-loadscope-reorder

test: install browser
	$(VENV)/bin/pytest -q $(XDIST)

test-fast: install
	$(VENV)/bin/pytest -q $(XDIST) -m "not slow"

# Test order: `make test` keeps one fixed order (pyproject's addopts turn pytest-randomly off), so its
# timings compare run to run. `make test-random` shuffles with pytest-randomly: the files, then the tests
# within each file (conftest then still starts the heavy groups first, the demo_run files on one worker),
# and reseeds `random` and numpy per test. The seed is printed first (-q hides pytest's header);
# `make test-random SEED=N` replays that order.
test-random: install browser
	@seed=$(if $(SEED),$(SEED),$$(od -An -N4 -tu4 /dev/urandom | tr -d ' ')); \
	echo "test order: pytest-randomly seed $$seed (make test-random SEED=$$seed replays it)"; \
	$(VENV)/bin/pytest -q $(XDIST) -p randomly --randomly-seed=$$seed

clean:
	rm -rf .tinyplm .dagster
