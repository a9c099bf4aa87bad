# The two commands of the README: `make demo` (the main job) and `make test`.
# Each installs what it needs first, so both work on a fresh machine.
PYTHON ?= python3
OUT ?= results/quick

.PHONY: install demo test test-fast test-slow check-install lint bench docs

install: .installed

.installed: pyproject.toml scripts/install.sh
	bash scripts/install.sh --with-browser
	touch .installed

demo: .installed
	$(PYTHON) -m ntklens reproduce fashion-mnist --scale quick --out $(OUT)

test: .installed
	$(PYTHON) -m pytest -m "not slow" -q
	$(PYTHON) -m pytest -m slow -q

test-fast: .installed
	$(PYTHON) -m pytest -m "not slow" -q

test-slow: .installed
	$(PYTHON) -m pytest -m slow -q

check-install:  # the wheel without extras in a fresh venv, as a user installs it
	PYTHON=$(PYTHON) bash scripts/check_clean_install.sh

lint: .installed
	ruff check .
	ruff format --check .

bench: .installed
	$(PYTHON) benchmarks/ntk_speed.py
	$(PYTHON) benchmarks/train_speed.py
	$(PYTHON) benchmarks/sweep_speed.py

docs: .installed
	$(PYTHON) -m mkdocs build --strict --site-dir build/site
