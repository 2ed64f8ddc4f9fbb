# Targets:
#   make quickstart   train the tiny model on synthetic shards and evaluate it (the quick start)
#   make test         the docs build and the whole suite, listing its 15 slowest tests (CI runs this)
#   make test-fast    the suite without the tests marked `slow` (full-size networks, real servers,
#                     multi-process and whole training runs): for the edit loop
#   make docs         build the documentation site into site/ (mkdocs --strict: a warning fails it)
#   make engine-demo  the data engine in miniature: 3 rounds on a synthetic domain
#   make install      .venv with the package and its dev extras
#   make labelstudio  Label Studio's own venv, for the engine's tests
#   make clean        remove the venvs, the built site and every run's outputs
# Each target installs what it needs first; `make install` is idempotent (re-runs pip only when
# pyproject.toml changes).
PYTHON ?= python3
VENV ?= .venv
# torch and torchvision are pinned together in the one pip command: an unpinned torch pulls
# several GB of CUDA extras, and a torch without its matching torchvision breaks timm/lightning.
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.installed
# Label Studio (the data engine's correction tool) lives in a virtualenv of its own: it pins
# numpy, pandas, Django and its SDK, and those pins must never constrain ours. Tests start it as
# a server on 127.0.0.1 and use its SDK as the oracle for our brush-RLE codec.
LABEL_STUDIO_VENV ?= .venv-labelstudio
LABEL_STUDIO_PIN ?= label-studio==1.23.2
LABEL_STUDIO_STAMP := $(LABEL_STUDIO_VENV)/.installed-$(LABEL_STUDIO_PIN)

.PHONY: install labelstudio test test-fast docs quickstart engine-demo clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet $(TORCH_PINS) -e '.[dev]'
	touch $(STAMP)

# A stamp per pin: changing LABEL_STUDIO_PIN reinstalls, rerunning does nothing. The venv's own
# .gitignore keeps it out of `git status` (Python 3.13's venv writes one; older ones do not).
labelstudio: $(LABEL_STUDIO_STAMP)

$(LABEL_STUDIO_STAMP):
	$(PYTHON) -m venv $(LABEL_STUDIO_VENV)
	echo '*' > $(LABEL_STUDIO_VENV)/.gitignore
	$(LABEL_STUDIO_VENV)/bin/python -m pip install --quiet '$(LABEL_STUDIO_PIN)'
	touch '$@'

# SAM_TRAIN_LABEL_STUDIO_VENV tells the tests where Label Studio lives; set, a missing venv fails them
# instead of skipping. The docs build runs first: it takes seconds, the suite minutes.
test: install docs labelstudio
	SAM_TRAIN_LABEL_STUDIO_VENV=$(LABEL_STUDIO_VENV) $(VENV)/bin/python -m pytest --durations=15

test-fast: install labelstudio
	SAM_TRAIN_LABEL_STUDIO_VENV=$(LABEL_STUDIO_VENV) $(VENV)/bin/python -m pytest -m "not slow"

docs: install
	$(VENV)/bin/mkdocs build --strict --site-dir site

# Trains the tiny model from scratch on synthetic shards (written on first use), evaluates it on
# held-out images and prints the summary; runs/quickstart/ holds metrics.json, loss_curve.png,
# overlay.png and the weights. Each run starts afresh.
quickstart: install
	rm -rf runs/quickstart
	$(VENV)/bin/sam-train fit experiment=quickstart

# The data engine in miniature: 3 rounds bootstrapping "cells", a synthetic domain the built-in tiny
# never saw, with the simulated annotator (the only reader of the cells' ground truth) as the person.
# Prints and writes runs/engine-demo/work/rounds.json. Each run starts afresh.
ENGINE_DEMO := runs/engine-demo
engine-demo: install
	rm -rf $(ENGINE_DEMO)
	$(VENV)/bin/sam-train data synth $(ENGINE_DEMO)/cells-pool --style cells --images 120 --seed 11
	$(VENV)/bin/sam-train data synth $(ENGINE_DEMO)/cells-heldout --style cells --images 40 --seed 12
	$(VENV)/bin/sam-train engine init $(ENGINE_DEMO)/work --config engine_demo --images $(ENGINE_DEMO)/cells-pool \
		'data.truth=[$(ENGINE_DEMO)/cells-pool]' 'data.eval=[$(ENGINE_DEMO)/cells-heldout]'
	$(VENV)/bin/sam-train engine run $(ENGINE_DEMO)/work

clean:
	rm -rf $(VENV) $(LABEL_STUDIO_VENV) outputs runs site .pytest_cache
