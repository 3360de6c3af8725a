#!/usr/bin/env bash
# Usage: bash bench/zero_eval/run_all.sh [python-with-deepspeed]  -- reruns every ZeRO evaluation and prints RESULT lines.
set -u
cd "$(dirname "$0")"
DSPY=${1:-/tmp/dsenv/bin/python}
export OMP_NUM_THREADS=1
for m in engine_plain engine direct1 direct2 deferred1 deferred2 deferred2hook; do
  echo "== ds_zero_moe.py $m 4 2"
  timeout 300 "$DSPY" ds_zero_moe.py $m 4 2 2>&1 | grep -E "^RESULT|overwrote|hooks fired|Error:" | sort -u | head -4
done
echo "== ds_init_timing.py 2"; timeout 300 "$DSPY" ds_init_timing.py 2 2>&1 | grep -E "RESULT|JIT|built"
echo "== fsdp2_dcp_reshard.py 2 2 1:1 4:4 4:2"; timeout 600 python fsdp2_dcp_reshard.py 2 2 1:1 4:4 4:2 2>&1 | grep -E "SAVE|RESULT|Error:"
echo "== fsdp2_deferred_dw.py 2"; timeout 300 python fsdp2_deferred_dw.py 2 2>&1 | grep -E "RESULT|Error:"
