#!/usr/bin/env bash
# `perceiver generate` before and after a change, alternated, as separate processes (BENCHMARKS.md "Per-token
# overhead"). BEFORE: a checkout of the older commit, e.g. `git worktree add /tmp/ab_before 99abe77`.
#   benchmarks/ab/token_overhead.sh /tmp/ab_before [rounds]
set -euo pipefail
before=$1
rounds=${2:-3}
here=$(cd "$(dirname "$0")/../.." && pwd)
python=${PYTHON:-$here/.venv/bin/python}
out=$(mktemp -d)
run() { # label checkout args...
    local label=$1 checkout=$2
    shift 2
    local line
    line=$(cd "$out" && PYTHONPATH=$checkout "$python" -m perceiver_cli generate "$@" 2>&1 | tail -1)
    echo "$label: $*: $line"
}
for round in $(seq "$rounds"); do
    for side in before after; do
        checkout=$before
        [ "$side" = after ] && checkout=$here
        run "$round $side" "$checkout" music --seconds 60 --seed 1 --no-audio --no-plot --out "$out/m.mid" --force
        run "$round $side" "$checkout" text --tokens 300 --seed 3 --out "$out/t.txt" --force
        run "$round $side" "$checkout" image --num-samples 1 --seed 2 --out "$out/i.png" --force
    done
done
rm -rf "$out"
