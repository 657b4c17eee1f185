# Everything runs as root: cer creates namespaces and mounts, and the tests dump and restore with CRIU.
PYTHON ?= python3
DEMO_ROOT ?= /tmp/cer-demo

.PHONY: setup demo test bench

setup:
	contrib/install-deps
	$(PYTHON) -m pip install --quiet --root-user-action=ignore -e '.[test]'

# The daemon on the bundled sample checkpoints (made by CRIU 4 with contrib/sample/make-checkpoint).
demo: setup
	cer start --debug --root $(DEMO_ROOT) --config contrib/sample/namespace_service.json

test: setup
	$(PYTHON) -m pytest

bench: setup
	$(PYTHON) benchmarks/bench_get.py
