# Two commands on a fresh machine: `make demo` and `make test` (both install what they need first).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
RUN ?= demo

.PHONY: install demo test lint tensorboard bench clean

install: $(VENV)/.installed

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

# train.ipynb generates the synthetic demo data (data/kaggle_3m) on first use.
demo: install
	mkdir -p runs/$(RUN)
	$(PY) -m papermill --log-output --cwd . train.ipynb runs/$(RUN)/train.ipynb -p run_name $(RUN)
	$(PY) -m papermill --log-output --cwd . inference.ipynb runs/$(RUN)/inference.ipynb -p run_dir runs/$(RUN)

test: install
	$(PY) -m pytest

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

tensorboard: install
	$(VENV)/bin/tensorboard --logdir runs

clean:
	rm -rf runs .cache
