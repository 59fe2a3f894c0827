# Set-up and the main jobs. `make demo` and `make test` work on a fresh clone.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The torch pair that imports cleanly on the development machines; override for other platforms.
TORCH ?= torch==2.14.1 torchvision==0.29.1
PRESET ?= demo
DEMO_DATA ?= data/demo
DATA ?= $(DEMO_DATA)
RUN ?= runs/$(PRESET)
EPOCHS ?=

.PHONY: setup demo test train clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e ".[export,test,demo]"
	touch $@

$(DEMO_DATA)/manifest.csv: | setup
	$(BIN)/swssl-demo-data $(DEMO_DATA)

# Data, training (which ends by building the memory bank), evaluation on the test split.
demo: setup $(DEMO_DATA)/manifest.csv
	$(BIN)/swssl-train --preset demo --data $(DEMO_DATA) --out runs/demo
	$(BIN)/swssl-eval runs/demo --data $(DEMO_DATA) --split test
	@echo "demo run: runs/demo (selected checkpoint best.pt, memory bank bank.safetensors, loss curve train_log.csv)"
	@echo "heatmaps: runs/demo/eval/test-aligned/heatmaps/"

test: setup
	$(BIN)/pytest -q

# make train                      -> the demo preset on the demo data (built when absent)
# make train PRESET=dbt DATA=/path -> the paper's DBT setting on your data
train: setup $(if $(filter $(DEMO_DATA),$(DATA)),$(DEMO_DATA)/manifest.csv)
	$(BIN)/swssl-train --preset $(PRESET) --data $(DATA) --out $(RUN) $(if $(EPOCHS),--epochs $(EPOCHS))

clean:
	rm -rf runs data/demo
