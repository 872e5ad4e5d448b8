#!/bin/bash
# The producer's start time, whole process: the median of 15 runs of each command, for each tree given
# (default: this checkout), e.g. bench/start_time.sh "$(git worktree add -q /tmp/old REV && echo /tmp/old)" .
set -euo pipefail
PY=${PY:-$(cd "$(dirname "$0")/.." && pwd)/.venv/bin/python}
median() { local f; f=$(mktemp); for _ in $(seq 15); do /usr/bin/time -f "%e" "$@" >/dev/null 2>>"$f"; done; sort -n "$f" | sed -n 8p; rm "$f"; }
for tree in "${@:-.}"; do
  tree=$(cd "$tree" && pwd)
  cd "$tree"
  echo "$tree: submit --help $(PYTHONPATH=$tree median "$PY" -c 'import sys; from producer.cli import main; sys.argv=["producer","submit","--help"]; main()') s;" \
       "import producer.api $(PYTHONPATH=$tree median "$PY" -c 'import producer.api') s"
done
echo "the interpreter alone: $(median "$PY" -c pass) s; $(lscpu | grep 'Model name' | sed 's/  */ /g')"
