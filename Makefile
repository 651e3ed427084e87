# laibao: `make run` serves, `make test` tests; both set up everything they need on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: run init test lint bench system-deps clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# Runtime install only (no test tools).
$(VENV)/.run-installed: $(BIN)/python setup.cfg pyproject.toml
	$(BIN)/pip install --quiet -e .
	touch $@

# Install with the test extras; also satisfies the runtime stamp.
$(VENV)/.test-installed: $(BIN)/python setup.cfg pyproject.toml
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@ $(VENV)/.run-installed

run: $(VENV)/.run-installed
	$(BIN)/laibao serve $(ARGS)

# A first .env: fresh keys, the Dify URL and key (prompted on a terminal, or ARGS="--dify-url U --dify-key K").
init: $(VENV)/.run-installed
	$(BIN)/laibao init $(ARGS)

# The tests start their own redis-server, MariaDB and HAProxy in temporary directories: the binaries must
# exist. (mariadbd and haproxy live in /usr/sbin, which is not on every user's PATH.) supervisord comes
# from the test extras, into the venv.
system-deps:
	@missing=""; \
	command -v redis-server >/dev/null 2>&1 || missing="redis-server"; \
	{ command -v mariadbd >/dev/null 2>&1 || [ -x /usr/sbin/mariadbd ]; } && command -v mariadb-install-db >/dev/null 2>&1 \
	  || missing="$$missing mariadb-server"; \
	{ command -v haproxy >/dev/null 2>&1 || [ -x /usr/sbin/haproxy ]; } || missing="$$missing haproxy"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing$$missing (Debian packages)"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  else \
	    echo "missing:$$missing: run 'sudo apt-get install$$missing' (or run make test as root)"; exit 1; \
	  fi; \
	fi

# Two workers (pytest-xdist): most tests wait on real servers, so two cores run the suite in about 60 % of
# the time. Each worker starts its own servers; PYTEST_ARGS="-n 0" runs in one process.
PYTEST_ARGS ?= -n 2
test: system-deps $(VENV)/.test-installed
	$(BIN)/pytest $(PYTEST_ARGS)

lint: $(VENV)/.test-installed
	$(BIN)/ruff check laibao handlers stores tests bench
	$(BIN)/mypy

bench: system-deps $(VENV)/.test-installed
	$(BIN)/python bench/poll.py
	$(BIN)/python bench/auth.py
	$(BIN)/python bench/scale.py 600

clean:
	rm -rf $(VENV) *.egg-info .mypy_cache .ruff_cache .hypothesis
