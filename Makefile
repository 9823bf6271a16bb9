# Tollgate: `make run` starts everything on a laptop, `make test` runs the whole suite.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
HOST ?= 127.0.0.1
PORT ?= 8000
MOCK_PORT ?= 8001

.PHONY: run test lint bench bench-billing venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q ".[dev]"
	@touch $(STAMP)

# Migrate, seed the demo (admin login, tenant, key), start the mock upstream, then serve
# the gateway with gunicorn on $(HOST):$(PORT). Ctrl-C stops both. Safe to run again.
run: $(STAMP)
	@mkdir -p .run
	@DJANGO_SETTINGS_MODULE=config.settings.local $(PY) manage.py migrate --noinput -v 0
	@DJANGO_SETTINGS_MODULE=config.settings.local $(PY) manage.py demo_setup \
		--gateway-url http://$(HOST):$(PORT) --mock-url http://127.0.0.1:$(MOCK_PORT)/v1
	@trap 'kill $$mock 2>/dev/null' EXIT; \
	DJANGO_SETTINGS_MODULE=config.settings.local $(PY) manage.py mockupstream \
		--port $(MOCK_PORT) > .run/mockupstream.log 2>&1 & mock=$$!; \
	DJANGO_SETTINGS_MODULE=config.settings.local GUNICORN_BIND=$(HOST):$(PORT) \
		$(VENV)/bin/gunicorn -c platform/gunicorn.conf.py config.wsgi

test: $(STAMP)
	@mkdir -p .run
	$(PY) -m pytest

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

bench: $(STAMP)
	$(PY) -m bench.gateway

# close_month over 100k to 1M usage events (200 tenants, 15 models) in a fresh database.
bench-billing: $(STAMP)
	$(PY) -m bench.billing

clean:
	rm -rf .run staticfiles
