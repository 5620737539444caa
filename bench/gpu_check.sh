#!/usr/bin/env bash
# One command for a GPU machine (prepared for one H200; under 8 minutes in all):
#
#   1. bench/gpu_throughput.py: tokens/s and MFU of the clm and seq2seq paths in bf16;
#   2. a bf16 example job end to end: `orch up` (a local cluster that detects the GPU),
#      `orch submit --wait jobs/t5_summarize.yaml` with resources.gpus=1 and bf16, its
#      metrics from the store, and the worker's own line saying it trained on cuda;
#   3. bench/adapters.py --device cuda (full-model against LoRA memory), if it exists.
#
# Prints one markdown table (check | result | seconds | details) to paste into
# docs/benchmarks.md. Exits non-zero when a check that ran failed.
#
#   bench/gpu_check.sh             # on the GPU machine
#   bench/gpu_check.sh --dry-run   # on a CPU: tiny models, a few steps, the job on CPU
#
# PYTHON names the interpreter (default: .venv/bin/python if present, else python3); it
# needs orch installed (`pip install -e .` with the CUDA build of torch). Each check runs
# under a time limit (GPU_CHECK_LIMITS="throughput job adapters", seconds).
set -uo pipefail
cd "$(dirname "$0")/.."

dry=0
[[ "${1:-}" == "--dry-run" ]] && dry=1
if [[ -n "${PYTHON:-}" ]]; then py=$PYTHON
elif [[ -x .venv/bin/python ]]; then py=.venv/bin/python
else py=python3
fi
read -r limit_tp limit_job limit_ad <<<"${GPU_CHECK_LIMITS:-210 120 120}"
work=$(mktemp -d /tmp/orch-gpu-check-XXXX)
rows="$work/rows.tsv"
: >"$rows"
failed=0
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1
row() { printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >>"$rows"; }

# -- 0. the machine -----------------------------------------------------------------------
gpu=$("$py" -c 'import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else "none")' 2>&1 | tail -1)
machine=$gpu
[[ "$gpu" == "none" ]] && machine="no GPU (dry run)"
if [[ $dry -eq 0 && "$gpu" == "none" ]]; then
  echo "no CUDA GPU visible to $py (torch: $("$py" -c 'import torch; print(torch.__version__)' 2>&1 | tail -1)); use --dry-run on a CPU" >&2
  exit 2
fi
row "machine" "$machine" "-" "python $("$py" -c 'import sys; print(sys.version.split()[0])'), torch $("$py" -c 'import torch; print(torch.__version__)' 2>/dev/null), $(nproc) CPUs"

# -- 1. throughput: tokens/s, MFU, bf16, clm and seq2seq ------------------------------------
start=$SECONDS
args=()
[[ $dry -eq 1 ]] && args=(--dry)
# 200 steps (30 warm-up) per path keep it near 2 minutes on an H200.
[[ $dry -eq 0 ]] && args=(--steps 200 --warmup 30)
timeout "$limit_tp" "$py" bench/gpu_throughput.py "${args[@]}" >"$work/throughput.log" 2>&1
rc=$?
if [[ $rc -eq 0 ]]; then
  cat >"$work/rows.py" <<'EOF'
import json, sys
for r in json.loads(sys.stdin.read()):
    mfu = "-" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
    mem = "-" if r["peak_mem_gib"] is None else f"{r['peak_mem_gib']} GiB"
    print(f"throughput {r['path']} (bf16)\t{r['tokens_per_s']:,} tokens/s, MFU {mfu}\t-\t"
          f"{r['params_m']}M params, batch {r['batch']}, {r['steps_timed']} steps timed, "
          f"{r['tflops']} TFLOP/s, peak memory {mem}, {r['device']}")
EOF
  tail -1 "$work/throughput.log" | "$py" "$work/rows.py" >>"$rows"
  row "throughput (both paths)" "ok" "$((SECONDS - start))" "bench/gpu_throughput.py ${args[*]}"
else
  failed=1
  row "throughput" "FAILED (exit $rc$([[ $rc -eq 124 ]] && echo ', time limit'))" "$((SECONDS - start))" "$(tail -3 "$work/throughput.log" | tr '\t\n' '  ' | cut -c1-300)"
fi

# -- 2. a bf16 example job end to end through orch -----------------------------------------
start=$SECONDS
off=${ORCH_TEST_PORT_OFFSET:-0}  # ports of its own, shifted as the tests' are
export ORCH_HOME="$work/orch-home" ORCH_SERVER_PORT=$((8779 + off)) ORCH_RAY_PORT=$((6399 + off)) \
  ORCH_RAY_DASHBOARD_PORT=$((8279 + off)) ORCH_RAY_CLIENT_PORT=$((9051 + off)) \
  ORCH_RAY_AGENT_PORT=$((52415 + off))
unset RAY_ADDRESS ORCH_SERVER_URL
if [[ $dry -eq 1 ]]; then
  sets=(--set resources.gpus=0 --set training.max_steps=20 --set training.eval_steps=10 --set training.save_steps=10)
else
  sets=(--set resources.gpus=1 --set resources.cpus=4 --set training.max_steps=600)
fi
sets+=(--set training.precision=bf16 --set training.epochs=null)
job_check() {
  "$py" -m orchestrator.cli up >"$work/up.log" 2>&1 || { echo "orch up failed: $(tail -2 "$work/up.log")"; return 1; }
  local id
  id=$("$py" -m orchestrator.cli submit --wait -q jobs/t5_summarize.yaml "${sets[@]}" 2>"$work/job.err") \
    || { echo "job failed: $(tail -3 "$work/job.err" | tr '\n' ' ')"; return 1; }
  id=$(echo "$id" | head -1)
  "$py" -m orchestrator.cli metrics "$id" -o json >"$work/metrics.json" || return 1
  "$py" -m orchestrator.cli logs "$id" >"$work/job.log" 2>&1
  "$py" - "$work/metrics.json" "$work/job.log" "$dry" <<'EOF'
import json, sys
rows = json.load(open(sys.argv[1]))["metrics"]
last = {}
for m in rows:
    last[m["name"]] = m["value"]
log = open(sys.argv[2]).read()
device = "cuda" if "training on cuda" in log else ("cpu" if "training on cpu" in log else "?")
steps = int(last.get("total_steps", 0))
runtime = last.get("train_runtime", float("nan"))
print(f"trained on {device}; {steps} steps in {runtime:.1f} s (train_runtime, "
      f"{steps / runtime:.1f} steps/s); eval_loss {last.get('eval_loss', float('nan')):.3f}, "
      f"ROUGE-L {last.get('eval_rougeL', float('nan')):.1f}")
if sys.argv[3] == "0" and device != "cuda":
    sys.exit("the worker did not train on cuda")
EOF
}
if summary=$(timeout "$limit_job" bash -c "$(declare -f job_check); $(declare -p py work sets dry); job_check" 2>&1); then
  row "bf16 job through orch submit --wait" "ok" "$((SECONDS - start))" "$(echo "$summary" | tail -1)"
else
  failed=1
  row "bf16 job through orch submit --wait" "FAILED" "$((SECONDS - start))" "$(echo "$summary" | tail -2 | tr '\t\n' '  ' | cut -c1-300)"
fi
"$py" -m orchestrator.cli down >/dev/null 2>&1

# -- 3. full model against LoRA: memory (bench/adapters.py, written elsewhere) ----------------
start=$SECONDS
if [[ -f bench/adapters.py ]]; then
  ad_args=(--device cuda)
  [[ $dry -eq 1 ]] && ad_args=(--device cpu --models tiny --steps 6 --warmup 2)
  if timeout "$limit_ad" "$py" bench/adapters.py "${ad_args[@]}" >"$work/adapters.log" 2>&1; then
    # Its last line is a JSON list of runs: one row each, with what it reports.
    cat >"$work/adapter_rows.py" <<'EOF'
import json, sys
lines = [x for x in open(sys.argv[1]).read().splitlines() if x.strip()]
try:
    runs = json.loads(lines[-1])
except (ValueError, IndexError):
    sys.exit(1)
if not runs:
    sys.exit(2)  # every run failed (it says why above its last line)
for r in runs:
    mem = (f"CUDA peak {r['cuda_peak_mib']} MiB" if r.get("cuda_peak_mib") is not None
           else f"peak RSS {r.get('peak_rss_mib')} MiB")
    print(f"adapters {r.get('model')} {r.get('method')}\t{mem}\t-\t"
          f"train state {r.get('train_state_mib')} MiB, {r.get('tokens_per_s')} tokens/s, "
          f"trainable {r.get('trainable_fraction')}, checkpoint {r.get('checkpoint_mib')} MiB")
EOF
    "$py" "$work/adapter_rows.py" "$work/adapters.log" >>"$rows"
    case $? in
      0) row "adapters: full vs LoRA memory" "ok" "$((SECONDS - start))" "bench/adapters.py ${ad_args[*]}" ;;
      2) failed=1
         row "adapters: full vs LoRA memory" "FAILED (no run succeeded)" "$((SECONDS - start))" \
           "$(grep -m1 -iE 'error|failed' "$work/adapters.log" | cut -c1-300)" ;;
      *) row "adapters: full vs LoRA memory" "ok (last line not a JSON list)" "$((SECONDS - start))" \
           "$(tail -1 "$work/adapters.log" | cut -c1-300)" ;;
    esac
  else
    rc=$?
    failed=1
    row "adapters: full vs LoRA memory" "FAILED (exit $rc$([[ $rc -eq 124 ]] && echo ', time limit'))" \
      "$((SECONDS - start))" "$(tail -2 "$work/adapters.log" | tr '\t\n' '  ' | cut -c1-300)"
  fi
else
  row "adapters: full vs LoRA memory" "skipped" "0" "bench/adapters.py is not in this checkout"
fi

# -- the table ------------------------------------------------------------------------------
echo
echo "gpu_check$([[ $dry -eq 1 ]] && echo ' (dry run, CPU)'): $(date -u +%Y-%m-%dT%H:%MZ), logs in $work"
echo
echo "| check | result | seconds | details |"
echo "| --- | --- | --- | --- |"
while IFS=$'\t' read -r a b c d; do
  echo "| $a | $b | $c | $d |"
done <"$rows"
exit $failed
