# kefu: the two commands a newcomer needs are `make run` and `make test`.
# Everything else here is what they are made of.

CARGO  ?= cargo
PYTHON ?= python3
# One optimised profile (dev, see Cargo.toml) serves the tests and the server.
KEFU    = $(CARGO) run --quiet --bin kefu --

.PHONY: run test build models models-test data splits fixtures \
        train-sentiment train-intent pretrain eval lint clean-models help cuda-toolkit build-cuda \
        check-cuda gpu-bundle

help:
	@echo "make run     fetch what is missing, build, serve on 127.0.0.1:50051"
	@echo "make test    fetch what is missing, build, run every test"
	@echo "make models  fetch the GGUF generators and bert-base-chinese's vocab (sha256-checked)"
	@echo "make data    fetch the review corpus and build data/splits/"
	@echo "make train-sentiment / train-intent   retrain the default classifiers"
	@echo "make pretrain   masked-LM pretraining the intent model starts from"
	@echo "make eval    accuracy and macro-F1 of the default classifiers on the test files"
	@echo "make lint    rustfmt and clippy, as CI runs them"
	@echo "make build-cuda   kefu with --features cuda, against make cuda-toolkit (no GPU needed)"
	@echo "make check-cuda   cargo check --features cuda (what CI runs to guard the GPU build)"
	@echo "make gpu-bundle   the CUDA binary, run-gpu.sh, gpu-check.sh and models in dist/kefu-gpu"

run: models
	$(KEFU) serve

# `cargo test` builds the library, the binary and every test in one go.
test: models-test
	$(CARGO) test --all-targets

# The same feature set as `cargo run` (dev-dependencies left out), so `make
# run` after `make build` compiles nothing.
build:
	$(CARGO) build --bin kefu

models:
	$(PYTHON) scripts/fetch.py models

# The tests need the small models only, not the 491 MB Qwen GGUF.
models-test:
	KEFU_SKIP_QWEN=1 $(PYTHON) scripts/fetch.py models

data:
	$(PYTHON) scripts/fetch.py data
	$(PYTHON) scripts/prepare_data.py

# Regenerate the transformers-written test fixtures (needs torch + transformers).
fixtures:
	$(PYTHON) scripts/hf_compat.py fixtures

# The committed default checkpoints were trained with exactly these commands.
# Both classifiers learn half from their labels and half from a character
# n-gram teacher's probabilities (scripts/ngram_teacher.py, needs
# scikit-learn; ~2 min for the reviews), each training line scored by a
# teacher fitted on the other folds. Both are fine-tuned from `make
# pretrain`'s encoder (models/pretrained, made first when it is missing).
train-sentiment: models data
	test -d models/pretrained || $(MAKE) pretrain
	$(PYTHON) scripts/ngram_teacher.py --data data/splits/sentiment-train.jsonl \
	  --out data/splits/sentiment-train-taught.jsonl
	$(KEFU) train --task sentiment --init models/pretrained --max-seq-len 96 \
	  --epochs 6 --batch-size 32 --learning-rate 1e-3 --seed 7 --half \
	  --data data/splits/sentiment-train-taught.jsonl --soft-weight 0.5 --windows 8 \
	  --dev data/splits/sentiment-dev.jsonl --out models/sentiment

# Masked-LM pretraining on the training splits' text (reviews, chat lines,
# intent messages, a third of them also in Traditional characters; never a
# test file): ~28 min on one core. Both classifiers are fine-tuned from it.
pretrain: models data
	$(KEFU) pretrain --vocab models/bert-base-chinese/vocab.txt \
	  --hidden-size 128 --layers 2 --heads 2 --intermediate-size 512 --max-seq-len 96 \
	  --epochs 3 --batch-size 32 --learning-rate 1e-3 --seed 42 \
	  --data data/splits/sentiment-train-traditional.jsonl --data data/splits/intent-train.jsonl \
	  --dev data/splits/sentiment-dev.jsonl --dev data/splits/intent-dev.jsonl \
	  --out models/pretrained

train-intent: models data
	test -d models/pretrained || $(MAKE) pretrain
	$(PYTHON) scripts/ngram_teacher.py --data data/splits/intent-train.jsonl \
	  --out data/splits/intent-train-taught.jsonl
	$(KEFU) train --task intent --init models/pretrained --max-seq-len 64 \
	  --epochs 40 --batch-size 16 --learning-rate 1e-3 --seed 7 --half --average 0.998 \
	  --data data/splits/intent-train-taught.jsonl --soft-weight 0.5 \
	  --dev data/splits/intent-dev.jsonl --out models/intent

eval: data
	$(KEFU) eval --model models/sentiment --data data/splits/sentiment-reviews-test.jsonl
	$(KEFU) eval --model models/sentiment --data data/sentiment/test.jsonl
	$(KEFU) eval --model models/sentiment --data data/sentiment/intent-test.jsonl
	$(KEFU) eval --model models/sentiment --data data/sentiment/test-hant.jsonl
	$(KEFU) eval --model models/intent --data data/intents/test.jsonl
	$(KEFU) eval --model models/intent --data data/intents/chat-test.jsonl
	$(KEFU) eval --model models/intent --data data/intents/test-hant.jsonl

# The GPU build. cuda-toolkit assembles CUDA 13.0 from NVIDIA's PyPI wheels
# into cuda/13.0 (sha256-pinned, idempotent; see scripts/cuda_toolkit.py).
cuda-toolkit:
	$(PYTHON) scripts/cuda_toolkit.py

# sm_80 (A100) code and PTX, plus sm_90a (H100/H200) code added by the
# toolkit's nvcc wrapper. x86-64-v3 instead of `native`: the binary runs on
# the GPU machine, not here. No debuginfo, so the binary stays small.
CUDA_TK = $(CURDIR)/cuda/13.0
CUDA_ENV = PATH="$(CUDA_TK)/bin:$$PATH" CUDA_HOME="$(CUDA_TK)" CUDA_COMPUTE_CAP=80 \
	  CUDARC_CUDA_VERSION=13000 RUSTFLAGS="-C target-cpu=x86-64-v3" CARGO_PROFILE_DEV_DEBUG=0 \
	  CARGO_TARGET_DIR="$${KEFU_CUDA_TARGET_DIR:-/var/tmp/kefu-target-cuda}"
build-cuda: cuda-toolkit
	$(CUDA_ENV) $(CARGO) build --bin kefu --features cuda

# CI's guard of the GPU build: type-checks kefu (every target) and every
# crate's Rust code with --features cuda. scripts/ci/nvcc stands in for the
# compiler, so the third-party CUDA kernels are not compiled (that is
# build-cuda's hour); no toolkit is needed. Own target dir: its empty kernel
# objects must never meet a real build. The stand-in is copied to a fixed
# path there, so a clone elsewhere does not rerun the kernel build scripts.
check-cuda:
	d="$${KEFU_CUDA_CHECK_TARGET_DIR:-/var/tmp/kefu-target-cuda-check}"; \
	mkdir -p "$$d/nvcc-stub" && \
	{ cmp -s scripts/ci/nvcc "$$d/nvcc-stub/nvcc" || cp scripts/ci/nvcc "$$d/nvcc-stub/nvcc"; } && \
	PATH="$$d/nvcc-stub:$$PATH" NVCC="$$d/nvcc-stub/nvcc" CUDA_COMPUTE_CAP=80 \
	  CUDARC_CUDA_VERSION=13000 CARGO_TARGET_DIR="$$d" \
	  $(CARGO) check --all-targets --features cuda

# GPU_BUNDLE_GENERATOR=qwen (default) | shape | none; see scripts/gpu/bundle.sh.
gpu-bundle: build-cuda
	PYTHON=$(PYTHON) scripts/gpu/bundle.sh

lint:
	$(CARGO) fmt --check
	$(CARGO) clippy --all-targets -- -D warnings
