# The two commands of the quick start: `make quickstart` and `make test`.
# Both install everything they need into .venv first; `make install` is idempotent
# (re-runs pip only when pyproject.toml changes).
PYTHON ?= python3
VENV ?= .venv
# torch and torchvision are pinned together in the one pip command: an unpinned torch pulls
# several GB of CUDA extras, and a torch without its matching torchvision breaks timm/lightning.
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.installed

.PHONY: install test quickstart clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet $(TORCH_PINS) -e '.[dev]'
	touch $(STAMP)

test: install
	$(VENV)/bin/python -m pytest

# Trains the tiny model from scratch on synthetic shards (written on first use), evaluates it on
# held-out images and prints the summary; runs/quickstart/ holds metrics.json, loss_curve.png,
# overlay.png and the weights. Each run starts afresh.
quickstart: install
	rm -rf runs/quickstart
	$(VENV)/bin/sam-train fit experiment=quickstart

clean:
	rm -rf $(VENV) outputs runs .pytest_cache
