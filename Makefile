# Two commands on a fresh machine: `make verify` and `make test`.
# Each creates .venv (if missing) and installs requirements.txt into it first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

# Nothing is downloaded at run time: Hugging Face models are built from local configs.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_VERBOSITY := error
export PYTHONDONTWRITEBYTECODE := 1

.PHONY: verify test lint generate train bench clean

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	touch $@

verify: $(VENV)/.installed
	$(PY) verify.py

test: $(VENV)/.installed
	$(PY) -m ruff check .
	$(PY) -m pytest -q

lint: $(VENV)/.installed
	$(PY) -m ruff check .

generate: $(VENV)/.installed
	$(PY) generate.py

# Trains the string-reversal model with torch (about 6 minutes on 1 thread) and writes
# checkpoints/reverse.npz, the checkpoint the repo ships. CI never trains.
train: $(VENV)/.installed
	$(PY) train.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis .ruff_cache
