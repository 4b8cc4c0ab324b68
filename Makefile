# Two commands on a fresh machine: `make verify` and `make test`.
# Each creates .venv (if missing) and installs requirements.txt into it first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

# Nothing is downloaded at run time: Hugging Face models are built from local configs.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_VERBOSITY := error
export PYTHONDONTWRITEBYTECODE := 1

.PHONY: verify test lint generate train train-draft train-ablation evaluate heatmap memory pictures bench bench-figures \
	bench-serving bench-sharing figures clean

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

# The tools a learner runs second. Each writes only under out/ (ignored by git) by default.
evaluate: $(VENV)/.installed
	$(PY) tools/evaluate.py

heatmap: $(VENV)/.installed
	$(PY) tools/heatmap.py

memory: $(VENV)/.installed
	$(PY) tools/memory.py

pictures: $(VENV)/.installed
	$(PY) tools/pictures.py

bench: $(VENV)/.installed
	$(PY) tools/bench.py

# The full benchmark (about 4 minutes on the AMD EPYC VM of docs/environment.md; a line per
# section on stderr), writing the committed figures/bench_*.png on purpose.
bench-figures: $(VENV)/.installed
	$(PY) tools/bench.py --figures figures --json out/bench/bench.json

# Prefix caching, parallel samples and cascade attention, measured (docs/sharing.md); its picture
# goes to out/sharing.png (make figures draws the committed one).
bench-sharing: $(VENV)/.installed
	$(PY) tools/bench_sharing.py --json out/bench_sharing.json

# The serving measurements (33 minutes at 1 thread on a busy 2-core VM: docs/benchmarks-serving.md),
# under out/serving/; the committed figures/serving_pool.png is redrawn by `make figures`.
bench-serving: $(VENV)/.installed
	$(PY) tools/bench_serving.py --threads 1

# Trains the string-reversal model with torch (about 6 minutes on 1 thread) and writes
# checkpoints/reverse.npz, the checkpoint the repo ships, and its log, on purpose: without --out,
# tools/train.py writes out/reverse.npz. CI never trains.
train: $(VENV)/.installed
	$(PY) tools/train.py --out checkpoints/reverse.npz

# The draft model of speculative decoding (beyond/speculative.py), about 3 minutes on 1 thread.
train-draft: $(VENV)/.installed
	$(PY) tools/train.py --draft --out checkpoints/reverse_draft.npz

# The unmasked run whose log figures/mask_ablation.png is drawn from (its weights stay in out/).
train-ablation: $(VENV)/.installed
	$(PY) tools/train.py --no-causal-mask --log checkpoints/reverse_no_mask.log.json

# Redraws the committed figures on purpose, each named with --out (about a minute; the block
# tables of figures/sharing.png come from their own small run, the same with --quick). Left out:
# the bench_*.png figures, which take minutes to measure (python tools/bench.py, see
# docs/benchmarks.md).
figures: $(VENV)/.installed
	$(PY) tools/heatmap.py --out figures/heatmap_trained.png
	$(PY) tools/heatmap.py --random --out figures/heatmap_random.png
	$(PY) tools/memory.py --out figures/cache_memory.png
	$(PY) tools/bench_paged_memory.py --out figures/paged_memory.png
	$(PY) tools/bench_sharing.py --quick --out figures/sharing.png
	$(PY) tools/bench_serving.py --picture --figures figures
	$(PY) tools/train.py --plot --figure figures/mask_ablation.png

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis .ruff_cache
