#!/usr/bin/env bash
# The GPU check (issue 23): on one CUDA machine with nothing downloaded, in under 8 minutes, each part under its
# own time limit and failing alone (one part failing keeps the others' figures):
#   stages    SFT and DPO steps of the full Qwen2.5-0.5B architecture (random weights, ../shared's config and
#             tokenizer) in bf16 mixed precision at up to 1,024 tokens, alignkit against TRL in the same run:
#             tokens/s, MFU, peak memory (bench/stages.py --size 0.5b --device cuda)
#   rl-vllm   GRPO steps with rl.engine vllm colocated, sleeping between rollouts: weight pushes, sleep/wake,
#             vllm_mismatch_kl, step and sampling times (alignkit rl); and the same steps with the
#             transformers engine, for the ratio
#   generate  `alignkit generate --engine vllm`: 64 prompts x 4 samples of 128 tokens, tokens/s
#   lm_head   bench/lm_head.py at the GPU size (24 layers, 8 x 2,048 tokens, bf16 autocast)
# Writes gpu.json and gpu.md (and each part's log) into $OUT if set, else bench/results/gpu-<date>.
#
#   bash bench/gpu.sh                 # on the GPU machine, from the repository root
#   bash bench/gpu.sh --cpu-smoke     # here: the same plumbing on the tiny model on a CPU (minutes; no vLLM parts
#                                     # unless vLLM imports), to check the script before a GPU is at hand
# Needs torch with CUDA, transformers, accelerate, datasets and trl (and vllm for rl-vllm and generate). A machine
# without registry access can carry wheels in .whl/ (see docs/speed-and-memory.md); they are installed into
# /tmp/site first. Environment: PYTHON (default python3), ALIGNKIT_SHARED (default ../shared).
set -u
cd "$(dirname "$0")/.."
ROOT=$(pwd)
SMOKE=0
[ "${1:-}" = "--cpu-smoke" ] && SMOKE=1
PY=${PYTHON:-python3}
SHARED=${ALIGNKIT_SHARED:-$ROOT/../shared}
export ALIGNKIT_SHARED=$SHARED
DATE=$(date -u +%Y-%m-%d)
RES=${OUT:-$ROOT/bench/results/gpu-$DATE}
[ $SMOKE = 1 ] && [ -z "${OUT:-}" ] && RES=$ROOT/bench/results/gpu-smoke-$DATE
mkdir -p "$RES"
WORK=$(mktemp -d /tmp/alignkit-gpu.XXXXXX)
START=$(date +%s)
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$ROOT:$ROOT/bench${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
PARTS=$RES/parts.jsonl
: > "$PARTS"

# part NAME LIMIT_S CMD...: runs CMD under `timeout`, its output in NAME.log, and records its status.
part() {
  local name=$1 limit=$2; shift 2
  local t0=$(date +%s)
  echo "== $name (limit ${limit}s)"
  timeout --kill-after=10 "$limit" "$@" > "$RES/$name.log" 2>&1
  local rc=$?
  echo "{\"part\": \"$name\", \"rc\": $rc, \"seconds\": $(( $(date +%s) - t0 )), \"limit_s\": $limit}" >> "$PARTS"
  echo "   rc $rc after $(( $(date +%s) - t0 )) s; last lines:"; tail -n 3 "$RES/$name.log" | sed 's/^/   /'
}

$PY - > "$RES/env.json" 2>&1 <<'EOF'
import importlib, json, platform
out = {"python": platform.python_version()}
for name in ("torch", "transformers", "accelerate", "datasets", "trl", "vllm"):
    try:
        out[name] = importlib.import_module(name).__version__
    except Exception as e:
        out[name] = f"missing ({type(e).__name__})"
try:
    import torch
    out["cuda"] = torch.cuda.get_device_name() if torch.cuda.is_available() else None
except Exception:
    pass
print(json.dumps(out))
EOF
cat "$RES/env.json"
HAS_VLLM=$($PY -c "import vllm" >/dev/null 2>&1 && echo 1 || echo 0)

if [ $SMOKE = 1 ]; then
  SIZE=tiny DEV=cpu PREC=fp32 L_STAGES=300 L_RL=300 L_GEN=200 L_LM=120
  STAGE_ARGS="--stages sft --reps 1 --steps 2 --warmup 1"
  RL_STEPS=2 NEW=16 NPROMPTS=8 LM_ARGS="--layers 1 --batch 1 --seq 128 --steps 1 --warmup 0"
else
  SIZE=0.5b DEV=cuda PREC=bf16 L_STAGES=200 L_RL=130 L_GEN=90 L_LM=80
  STAGE_ARGS="--stages sft,dpo --reps 1 --steps 8 --warmup 3"
  RL_STEPS=4 NEW=128 NPROMPTS=64 LM_ARGS="--layers 24 --batch 8 --seq 2048 --bf16 --steps 3 --warmup 1"
fi

# 1. SFT and DPO against TRL (bench/stages.py builds the model and the data in $WORK).
part stages $L_STAGES $PY bench/stages.py --size $SIZE --device $DEV $STAGE_ARGS --work "$WORK" --out "$RES/stages"

# The model and prompts for the next parts (stages.py wrote them; rebuilt if it failed early).
[ -f "$WORK/model/config.json" ] || $PY -c "
import sys; sys.argv = ['stages.py']
sys.path.insert(0, 'bench'); import stages
from pathlib import Path
s = {'size': '$SIZE', 'max_length': 512, 'sft_batch': 1, 'dpo_batch': 1, 'grad_accum': 1, 'steps': 1}
stages.prepare(Path('$WORK'), s)" > "$RES/prepare.log" 2>&1

# 2. GRPO with the colocated vLLM engine, then with transformers, the same steps.
RL=( $PY -m alignkit.cli rl --model.name-or-path "$WORK/model" --prompts.dataset "$WORK/data/prompts.jsonl"
  --prompts.split train --reward.kind rule --reward.rule stages:length_reward
  --allow-python-verifier --rl.algo grpo --rl.k 4 --rl.max-new-tokens 32 --rl.beta 0.04 --rl.log-samples-steps 0
  --train.max-steps $RL_STEPS --train.batch-size 4 --train.learning-rate 1e-6
  --train.scheduler constant --train.logging-steps 1 --train.save-steps 1000000 --train.precision $PREC --quiet true )
if [ $HAS_VLLM = 1 ]; then
  part rl-vllm $L_RL "${RL[@]}" --rl.engine vllm --rl.vllm.sleep true --rl.vllm.gpu-memory-utilization 0.3 \
    --output-dir "$WORK/rl-vllm"
else
  echo '{"part": "rl-vllm", "rc": null, "skipped": "vllm does not import"}' >> "$PARTS"
fi
part rl-transformers $L_RL "${RL[@]}" --rl.engine transformers --output-dir "$WORK/rl-transformers"

# 3. alignkit generate with vLLM (n samples of each prompt).
if [ $HAS_VLLM = 1 ]; then
  part generate-vllm $L_GEN $PY -m alignkit.cli generate --model.name-or-path "$WORK/model" \
    --prompts.dataset "$WORK/data/prompts.jsonl" --prompts.split train --prompts.max-prompts $NPROMPTS \
    --engine vllm --sampling.temperature 1.0 --sampling.n 4 --sampling.max-new-tokens $NEW \
    --precision $PREC --output-dir "$WORK/gen-vllm" --quiet true
else
  echo '{"part": "generate-vllm", "rc": null, "skipped": "vllm does not import"}' >> "$PARTS"
fi

# 4. The output layer's bench at the GPU size.
part lm_head $L_LM $PY bench/lm_head.py --config "$WORK/model" $LM_ARGS

# Gather: one JSON and one Markdown table, whatever failed.
$PY - "$RES" "$WORK" "$START" "$SMOKE" <<'EOF'
import json, statistics, sys, time
from pathlib import Path
res, work, start, smoke = Path(sys.argv[1]), Path(sys.argv[2]), float(sys.argv[3]), sys.argv[4] == "1"
parts = [json.loads(l) for l in (res / "parts.jsonl").read_text().splitlines() if l.strip()]
out = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpu_smoke": smoke,
       "env": json.loads((res / "env.json").read_text().splitlines()[-1]), "parts": parts,
       "total_s": time.time() - start}
stages = res / "stages" / "stages.json"
if stages.is_file():
    out["stages"] = json.loads(stages.read_text())["summary"]
for engine in ("vllm", "transformers"):
    m = work / f"rl-{engine}" / "metrics.jsonl"
    if m.is_file():
        rows = [json.loads(l) for l in m.read_text().splitlines() if l.strip()]
        rows = [r for r in rows if "time_sample_s" in r]
        keys = ("time_sample_s", "time_logprobs_s", "sampled_tokens_per_s", "vllm_mismatch_kl", "vllm_logp_diff",
                "vllm_weight_pushes", "vllm_sleeps", "vllm_wakes", "loss")
        later = rows[1:] or rows
        keys += tuple(k for k in (later[0] if later else {}) if k.startswith("vllm_") and k not in keys)
        out[f"rl_{engine}"] = {k: statistics.median(r[k] for r in later) for k in keys
                               if later and isinstance(later[0].get(k), (int, float))}
        out[f"rl_{engine}"]["steps"] = len(rows)
g = work / "gen-vllm" / "responses.jsonl"
glog = res / "generate-vllm.log"
if g.is_file():
    rows = [json.loads(l) for l in g.read_text().splitlines() if l.strip()]
    secs = next((p["seconds"] for p in parts if p["part"] == "generate-vllm"), None)
    toks = sum(r.get("n_tokens", 0) for r in rows)
    out["generate_vllm"] = {"responses": len(rows), "tokens": toks, "seconds_incl_startup": secs,
                            "tokens_per_s_incl_startup": toks / secs if secs else None}
lm = res / "lm_head.log"
if lm.is_file():
    out["lm_head"] = lm.read_text().splitlines()[-6:]
(res / "gpu.json").write_text(json.dumps(out, indent=1))
md = [f"# GPU check, {out['date']}{' (CPU smoke, tiny model: no GPU figures)' if smoke else ''}", "",
      f"Environment: `{json.dumps(out['env'])}`; total {out['total_s']:.0f} s. Command: `bash bench/gpu.sh"
      f"{' --cpu-smoke' if smoke else ''}`.", "", "| part | status | seconds (limit) |", "|---|---|---|"]
for p in parts:
    status = p.get("skipped") or ("ok" if p["rc"] == 0 else "timed out" if p["rc"] in (124, 137) else f"failed (rc {p['rc']})")
    md.append(f"| {p['part']} | {status} | {p.get('seconds', '-')} ({p.get('limit_s', '-')}) |")
if (res / "stages" / "stages.md").is_file():
    md += ["", "## SFT and DPO against TRL", "", (res / "stages" / "stages.md").read_text()]
for engine in ("vllm", "transformers"):
    if f"rl_{engine}" in out:
        md += ["", f"## GRPO, rl.engine {engine} (medians over steps after the first)", "",
               "| metric | value |", "|---|---|"] + [f"| {k} | {v:.4g} |" for k, v in out[f"rl_{engine}"].items()]
if "generate_vllm" in out:
    md += ["", "## alignkit generate --engine vllm", "", "| metric | value |", "|---|---|"] + \
          [f"| {k} | {v if not isinstance(v, float) else f'{v:.4g}'} |" for k, v in out["generate_vllm"].items()]
if "lm_head" in out:
    md += ["", "## bench/lm_head.py", "", "```", *out["lm_head"], "```"]
(res / "gpu.md").write_text("\n".join(md) + "\n")
print("\n".join(md))
EOF
echo "results: $RES (total $(( $(date +%s) - START )) s)"
rm -rf "$WORK"
