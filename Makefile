# tunekit — two set-up commands: `make demo` (end to end on the tiny local base, CPU) and `make test`.
# Everything installs itself into $(VENV) on first use; nothing is assumed to be on the machine but python3.

VENV    ?= .venv
PYTHON  ?= python3
PY      := $(VENV)/bin/python
TUNEKIT := $(VENV)/bin/tunekit
# CPU torch: the exact build the stack was verified with. On a CUDA machine use the Dockerfile instead.
TORCH   ?= torch==2.13.0
# DeepSpeed compiles a small op on first use (~60 s): keep it between runs.
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
export TOKENIZERS_PARALLELISM ?= false
# One thread per process: on 2 shared cores more threads were 8-25x slower (CPU-STACK.md, tiny.py).
export OMP_NUM_THREADS ?= 1
export WANDB_MODE ?= offline

CONFIG  ?= configs/tiny-lora.yaml
RUN     ?= runs/demo
OUT     ?= $(RUN)/export
FORMAT  ?= merged
DTYPE   ?=
BASE    ?=
MAX_SHARD_SIZE ?=
TINY    := artifacts/tiny-base
DEMO_DATA := artifacts/demo-data

.PHONY: venv demo tiny train merge export test bench clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml requirements/cpu.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -r requirements/cpu.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $@

# The tiny Llama base (built and briefly pretrained locally; cached) and the demo task's train/eval files.
tiny: venv
	$(TUNEKIT) build-tiny --out $(TINY) --preset demo --demo-data $(DEMO_DATA)

demo: tiny
	$(TUNEKIT) train configs/demo.yaml --overwrite
	$(TUNEKIT) merge runs/demo --out runs/demo/merged --overwrite
	# LoRA vs full fine-tuning (ZeRO-3, one process) at equal training FLOPs, side by side (~2 min)
	$(TUNEKIT) compare configs/demo.yaml configs/tiny-full-zero3.yaml --budget flops --out runs/demo-compare \
		--overwrite --set data.max_seq_len=64 --set eval.task_samples=32
	@echo "demo run: runs/demo (summary.json, report.md, final/, merged/); comparison: runs/demo-compare/compare.md"

train: tiny
	$(TUNEKIT) train $(CONFIG) $(ARGS)

# make merge RUN=runs/demo OUT=dir [DTYPE=bf16|fp16|fp32] [BASE=original] [ARGS=--overwrite]
merge: venv
	$(TUNEKIT) merge $(RUN) --out $(OUT) $(if $(DTYPE),--dtype $(DTYPE)) $(if $(BASE),--base $(BASE)) $(ARGS)

# make export RUN=runs/demo OUT=dir FORMAT=merged|adapter [DTYPE=...] [MAX_SHARD_SIZE=2GB] [ARGS=--overwrite]
export: venv
	$(TUNEKIT) export $(RUN) --out $(OUT) --format $(FORMAT) $(if $(DTYPE),--dtype $(DTYPE)) \
		$(if $(MAX_SHARD_SIZE),--max-shard-size $(MAX_SHARD_SIZE)) $(ARGS)

test: venv
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -ra $(PYTEST_ARGS)

bench: tiny
	$(PY) scripts/bench_all.py

clean:
	rm -rf runs artifacts .cache
