# forgec — everything a fresh machine needs is installed from here.
# Python 3.11 to 3.13; the first found, 3.11 first (torch 2.13.0's CPU-only wheel, which the
# numerics goldens come from, is the one installed there). `make test PYTHON=python3.12`.
PYTHON ?= $(or $(shell for p in python3.11 python3.12 python3.13; do \
	$$p -c '' 2>/dev/null && { echo $$p; break; }; done),python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: venv test demo lint clean parser

venv: $(STAMP)

# Re-install only when the project metadata changes; `make venv` is idempotent.
$(STAMP): pyproject.toml setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[train,dev]'
	touch $(STAMP)

test: venv
	$(BIN)/forgec build --check specs/*.forge
	$(BIN)/python -m pytest -q --durations=15 tests

# compiler/grammar_lalr.py: the LALR tables (and lark's small parser runtime) for
# compiler/grammar.lark; regenerate after editing the grammar (a test fails if stale).
parser: venv
	$(BIN)/python -m lark.tools.standalone --propagate_positions --lexer basic compiler/grammar.lark \
		-o compiler/grammar_lalr.py

lint: venv
	$(BIN)/ruff check compiler runtime tests generated

# ~3 minutes on 2 CPU cores: check and build every spec, train the debug model on
# the Python standard library's sources (loss 5.6 -> 2.1), then sample from it;
# then train the VLM (specs/vlm.forge) on synthetic captioned images (~2 minutes):
# its held-out caption-token accuracy with the true images pulls away from that with
# shuffled images (0.932 vs 0.887 at step 800; on the tokens only the image decides
# 0.631 vs 0.420; whole captions 0.180 vs 0.016), and it captions held-out images
# (3 of 8 exactly right).
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
	$(BIN)/forgec train specs/vlm.forge --out $(DEMO)/vlm --steps 800 --batch-size 16 \
		--lr 3e-3 --warmup 10 --eval-every 200 --seed 0
	@echo "--- captions of held-out images by $(DEMO)/vlm (image prefill, cached decode) ---"
	$(BIN)/forgec generate $(DEMO)/vlm --samples 8
	@echo "--- VLM loss and eval curves: $(DEMO)/vlm/loss.png ---"

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
