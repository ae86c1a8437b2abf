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

demo: venv
	$(BIN)/forgec check specs/*.forge
	$(BIN)/forgec info specs/llama3_8b.forge
	$(BIN)/forgec build specs/*.forge

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
