# tinyplm: `make demo` (set up + whole pipeline on the demo corpus), `make test` (the test suite).
VENV ?= .venv
PY := $(VENV)/bin/python
export DAGSTER_HOME ?= $(CURDIR)/.dagster
export DAGSTER_DISABLE_TELEMETRY := 1
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install demo test dagster-home clean

# torch first and exactly pinned: it comes from the CPU wheel; a looser range would pull CUDA.
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
	$(VENV)/bin/dagster job execute -m tinyplm_assets -j pretrain_all -c configs/demo.yaml
	@$(PY) -m tinyplm_assets.locate bert_stage2_jawiki

test: install
	$(VENV)/bin/pytest -q

clean:
	rm -rf .tinyplm .dagster
