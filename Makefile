# forgec — everything a fresh machine needs is installed from here.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: venv test demo lint clean

venv: $(STAMP)

# Re-install only when the project metadata changes; `make venv` is idempotent.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

test: venv
	$(BIN)/forgec build --check specs/*.forge
	$(BIN)/python -m pytest -q tests

lint: venv
	$(BIN)/ruff check compiler runtime tests generated

# ~2 minutes on 2 CPU cores: check and build every spec, train the debug model on
# the Python standard library's sources (loss ~5.6 -> ~2.3), then sample from it.
DEMO := runs/demo
demo: venv
	$(BIN)/forgec check specs/*.forge
	$(BIN)/forgec info specs/llama3_8b.forge
	rm -rf $(DEMO)
	$(BIN)/forgec build -o $(DEMO)/all_packages specs/*.forge
	$(BIN)/forgec train specs/llama_debug.forge --out $(DEMO) --steps 160 --batch-size 16 \
		--seq-len 128 --lr 3e-3 --ckpt-every 40 --seed 0
	@echo "--- sample from $(DEMO) (temperature 0.7, top-k 40) ---"
	$(BIN)/forgec generate $(DEMO) --prompt 'def ' --max-new-tokens 240 --temperature 0.7 \
		--top-k 40 --seed 0
	@echo "--- loss curve: $(DEMO)/loss.png, metrics: $(DEMO)/metrics.jsonl ---"

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
