# `perceiver eval --dtype fp32` of text-v1 on one validation book, alternated between two trees (two rounds):
# wall seconds and bits/byte of each (BENCHMARKS.md "Stop 38"). Run from the project root after
# `perceiver prepare text --input ../shared/data/text --out data/text --tokenizer tokenizers/text-v1.model`;
# make a tree with `git worktree add /tmp/before COMMIT`.
#
#     bash benchmarks/ab/eval_fp32_against_tree.sh BEFORE_TREE AFTER_TREE
root=$(pwd)
for round in 1 2; do
  for tree in "$1" "$2"; do
    start=$(date +%s.%N)
    out=$(cd "$tree" && PYTHONPATH="$tree" "$root/.venv/bin/python" -m perceiver_cli eval --checkpoint "$root/checkpoints/text-v1" \
      --data "$root/data/text" --dtype fp32 --max-documents 1 --json --quiet)
    end=$(date +%s.%N)
    echo "$tree round $round: $(echo "$end - $start" | bc) s  $(echo "$out" | grep -o '"bits_per_byte": [0-9.]*')"
  done
done
