# make setup | make demo | make test | make bench
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_DIR ?= runs/demo
DEMO_EPOCHS ?= 10
DEMO_BATCH ?= 64

.PHONY: setup demo test bench clean fashion-mnist

# The demo's real dataset, from Debian's package (offline-installable); needs root.
fashion-mnist:
	@if [ "$$(id -u)" = 0 ]; then DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist || \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist); \
	else echo "Fashion-MNIST missing: run 'sudo apt-get install -y dataset-fashion-mnist'"; exit 2; fi

$(BIN)/python:
	$(PY) -m venv $(VENV)

# Idempotent: re-running only checks that the pinned packages are present.
setup: $(BIN)/python
	$(BIN)/pip install -q -c constraints.txt -e '.[dev,plot,timm,export]'

demo: setup
	@test -d /usr/share/datasets/fashion-mnist || $(MAKE) --no-print-directory fashion-mnist
	rm -rf $(DEMO_DIR)
	$(BIN)/instdisc train fashion-mnist:train --out $(DEMO_DIR) --epochs $(DEMO_EPOCHS) --batch-size $(DEMO_BATCH)
	$(BIN)/instdisc compare $(DEMO_DIR) --train fashion-mnist:train --test fashion-mnist:test
	$(BIN)/instdisc export-encoder $(DEMO_DIR) --out $(DEMO_DIR)/encoder --overwrite
	$(BIN)/instdisc export-features $(DEMO_DIR)/encoder fashion-mnist:test --out $(DEMO_DIR)/features-test.h5 --overwrite
	$(BIN)/instdisc linear-probe $(DEMO_DIR)/encoder --train fashion-mnist:train --test fashion-mnist:test
	$(BIN)/instdisc plot $(DEMO_DIR) --out $(DEMO_DIR)/curves.png
	$(BIN)/instdisc plot-embedding $(DEMO_DIR)/features-test.h5 fashion-mnist:test --thumbnails 12 --out $(DEMO_DIR)/map.png
	@echo "pictures: training curves $(DEMO_DIR)/curves.png, embedding map $(DEMO_DIR)/map.png (see docs/visualisation.md)"

test: setup
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python benchmarks/run_all.py

clean:
	rm -rf runs .pytest_cache
