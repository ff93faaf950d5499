#!/bin/bash
# `perceiver train` from another checkout (an earlier commit's) against this tree, alternated ROUNDS times: each
# run imports perceiver_cli from its own tree and trains STEPS (default 30) steps; prints the wall time and the
# trainer's own targets/s (its last metrics.jsonl line: all targets over all seconds, the first slow steps too).
#
#   git worktree add /tmp/before COMMIT
#   PYTHON=.venv/bin/python STEPS=100 benchmarks/ab/train_against_tree.sh ROUNDS DATA "TRAIN ARGUMENTS" /tmp/before "$PWD"
rounds=$1 data=$(realpath "$2") arguments=$3
shift 3
for _ in $(seq "$rounds"); do
    for tree in "$@"; do
        out=$(mktemp -d)
        start=$(date +%s.%N)
        (cd "$tree" && PYTHONPATH="$tree" "${PYTHON:-python3}" -m perceiver_cli train --data "$data" --out "$out/run" $arguments \
            --steps "${STEPS:-30}" --eval-every 1000 --quiet > /dev/null 2>&1)
        end=$(date +%s.%N)
        echo "$tree: wall $(echo "$end - $start" | bc) s, $(tail -1 "$out/run/metrics.jsonl" | grep -o '"targets_per_s": [0-9.]*')"
        rm -rf "$out"
    done
done
