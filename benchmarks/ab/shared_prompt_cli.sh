# `perceiver generate text` from one prompt, 16 samples in one batch, in two trees alternated: wall seconds
# (BENCHMARKS.md "Stop 37"). The prompt: the first 12,000 characters of BENCHMARKS.md as of 5962f79.
#   bash benchmarks/ab/shared_prompt_cli.sh BEFORE_TREE AFTER_TREE   (run from this checkout, its .venv)
set -e
python=$(pwd)/.venv/bin/python
prompt=$(mktemp) out=$(mktemp -d)
git show 5962f79:BENCHMARKS.md | head -c 12000 > "$prompt"
for round in 1 2; do
  for tree in "$1" "$2"; do
    rm -rf "$out/samples"
    /usr/bin/time -f "$tree %e s" bash -c "cd $tree && $python -m perceiver_cli generate text --prompt-file $prompt \
      --tokens 1000 -n 16 -b 16 --out-dir $out/samples --seed 1 --quiet" 2>&1 | tail -1
  done
done
rm -rf "$prompt" "$out"
