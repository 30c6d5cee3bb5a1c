# spamtrap: `make run` and `make test` are all a newcomer needs.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
PYTHON ?= python3
# Debian packages the tests use: real SMTP tools, Redis, ClamAV, SpamAssassin, HAProxy,
# pyzord (pyzor; python3-gdbm for its gdbm engine), Chromium (the dashboard in a browser).
DEBS := swaks curl postfix redis-server clamav-daemon clamav spamassassin spamc spamd haproxy \
	dpkg-dev debhelper dh-python pybuild-plugin-pyproject python3-all python3-setuptools \
	python3-wheel lintian procmail mutt tmux chromium pyzor python3-gdbm

.PHONY: run test test-unit lint deps venv debs exim bench clean check-config

$(VENV)/.stamp: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e '.[test]' --config-settings editable_mode=compat
	touch $@

venv: $(VENV)/.stamp

# Installs the Debian packages the test suite needs (root or sudo).
debs:
	@missing=""; for p in $(DEBS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	command -v npm >/dev/null 2>&1 || missing="$$missing npm"; \
	if [ -n "$$missing" ]; then \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  echo "installing Debian packages:$$missing"; \
	  echo "postfix postfix/main_mailer_type select No configuration" | $$SUDO debconf-set-selections; \
	  $$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q $$missing; \
	fi

deps: venv debs

# A private Exim for the forwarder tests (apt-get download + dpkg-deb -x into
# .venv/exim4; it does not replace postfix). The tests fetch it on first use.
exim: venv
	$(PY) -m tests.support.exim

run: venv
	$(VENV)/bin/twistd -n spamtrap $(ARGS)

test: deps
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy spamtrap twisted/plugins
	$(PY) -m pytest -q $(PYTEST_ARGS)

# The unit layer alone: no sockets, no processes, no Debian packages (docs/testing.md).
test-unit: venv
	$(PY) -m pytest -q tests/unit $(PYTEST_ARGS)

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy spamtrap twisted/plugins

check-config: venv
	$(VENV)/bin/spamtrap check-config etc/spamtrap.yaml

bench: deps
	$(PY) -m bench.run $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info spamtrap-data .pytest_cache .mypy_cache .ruff_cache
