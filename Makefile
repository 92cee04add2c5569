# The README's two commands. Each sets up .venv the first time (scripts/setup_env.sh decides where torch comes from).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test setup clean-demo

$(STAMP): pyproject.toml scripts/setup_env.sh
	VENV=$(VENV) bash scripts/setup_env.sh
	touch $@

setup: $(STAMP)

demo: $(STAMP)
	$(PY) tools/demo.py $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q $(ARGS)

clean-demo:
	rm -rf runs/demo
