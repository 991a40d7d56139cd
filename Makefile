# The two commands of the README. Both set themselves up (.venv) on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

# No model hub is needed by tests or the demo: fail fast instead of retrying the network.
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export TRANSFORMERS_NO_ADVISORY_WARNINGS := 1

.PHONY: demo test install bench bench-grpo clean

$(VENV)/.installed: pyproject.toml scripts/install.sh
	PYTHON=$(PYTHON) VENV=$(VENV) scripts/install.sh

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(PY) -m bipost.cli.main demo --out demo_out

test: $(VENV)/.installed
	$(PY) -m pytest tests

bench: $(VENV)/.installed
	$(PY) bench/run.py

bench-grpo: $(VENV)/.installed
	$(PY) bench/grpo.py

clean:
	rm -rf $(VENV) demo_out
