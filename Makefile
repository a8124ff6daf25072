# One-command set-up on a fresh Debian machine: `make demo`, `make test`, `make bench`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
APT_PACKAGES := docker-registry redis-server skopeo apache2-utils time chromium
PYTEST_ARGS ?= -n 2

.PHONY: install system-deps venv test unit lint demo bench up down clean

install: system-deps venv

# Debian packages the tests, demo and bench run against (real registries, Redis, skopeo;
# Chromium for the test that renders Flower's pages).
system-deps:
	@missing=""; for b in docker-registry redis-server skopeo htpasswd /usr/bin/time chromium; do \
	  command -v $$b >/dev/null 2>&1 || missing="$$missing $$b"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages for:$$missing"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $(APT_PACKAGES); \
	fi

$(BIN)/syncer: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	@touch $@

venv: $(BIN)/syncer

test: install
	$(BIN)/pytest $(PYTEST_ARGS)

unit: venv
	$(BIN)/pytest -q tests/unit

lint: venv
	$(BIN)/ruff check .

# Both modes on throw-away local registries; stops everything it starts (also on Ctrl-C).
# DEMO_ARGS=--hold keeps Redis, the workers and Flower up until Enter, to look around.
demo: install
	$(BIN)/python -m scripts.demo $(DEMO_ARGS)

bench: install
	$(BIN)/python -m scripts.bench

# Distributed stack (needs a Docker engine): redis, workers, flower, one-shot planner.
up:
	docker compose up -d redis worker flower

down:
	docker compose down

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info demo-out bench-out
