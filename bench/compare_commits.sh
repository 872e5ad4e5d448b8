#!/usr/bin/env bash
# The engine (c) of another commit against this tree's, on the bench workload, in one run on one machine:
# rounds of (other, this) alternate so that the machine's drift hits both alike.
#   bench/compare_commits.sh COMMIT [DTYPE] [ROUNDS]      e.g. bench/compare_commits.sh 12d047e bfloat16 2
#   WORKLOAD=fewshot bench/compare_commits.sh ...            another workload of ../shared/bench (prompts, fewshot, rewrite)
set -euo pipefail
cd "$(dirname "$0")/.."
commit=${1:?usage: bench/compare_commits.sh COMMIT [DTYPE] [ROUNDS]}
dtype=${2:-bfloat16}
rounds=${3:-2}
here=$(pwd)
prompts=$(cd ../shared/bench && pwd)/${WORKLOAD:-prompts}.jsonl
other=$(mktemp -d /tmp/bulkgen-compare-XXXXXX)
trap 'git worktree remove --force "$other" >/dev/null 2>&1 || true' EXIT
git worktree add --detach -f "$other" "$commit" >/dev/null
echo "engine $dtype, $prompts, $(lscpu | sed -n 's/^Model name: *//p'); tokens/s per run"
for round in $(seq 1 "$rounds"); do
  for tree in "$other" "$here"; do
    label=$([ "$tree" = "$here" ] && echo "this tree" || echo "$commit")
    out=$(mktemp /tmp/bulkgen-compare-XXXXXX.json)
    (cd "$tree" && HF_HUB_OFFLINE=1 "$here/.venv/bin/python" -m bench.measure engine --dtype "$dtype" --timing-only \
        --prompts "$prompts" --out "$out" 2>/dev/null)
    "$here/.venv/bin/python" -c "import json,sys; r=json.load(open(sys.argv[1])); print(f'round {sys.argv[2]}  {sys.argv[3]:>10}: {r[\"tokens\"]} tokens in {r[\"seconds\"]:.1f} s = {r[\"tokens\"]/r[\"seconds\"]:.1f} tokens/s')" "$out" "$round" "$label"
    rm -f "$out"
  done
done
