# Everything runs as root: cer creates namespaces and mounts, and the tests dump and restore with CRIU.
PYTHON ?= python3
DEMO_ROOT ?= /tmp/cer-demo

.PHONY: setup demo test bench

# The project first: install-deps checks that pycriu loads, which needs the protobuf it brings.
setup:
	$(PYTHON) -m pip install --quiet --root-user-action=ignore -e '.[test]'
	contrib/install-deps

# The daemon on the bundled sample checkpoints (made by CRIU 4 with contrib/sample/make-checkpoint).
demo: setup
	cer start --debug --root $(DEMO_ROOT) --config contrib/sample/namespace_service.json

test: setup
	$(PYTHON) -m pytest

bench: setup
	$(PYTHON) benchmarks/bench_get.py
