#!/usr/bin/env bash
# speedrun.sh's preflight: decide the preset (PRESET=auto) and, for the GPU preset, check before
# anything long starts that torch can use the GPUs, that they are free, and that the disk holds the run.
#
#   PRESET=$(bash dev/preflight.sh)      # stdout is one word, gpu or cpu; every message goes to stderr
#
# A failed check exits 1 with the numbers and the fix. Run as a child (not sourced) so that its
# `exit` stops only itself and `set -e` in the caller stops the run.
# Environment: PY (the python that has torch, default .venv/bin/python), PRESET (auto|gpu|cpu),
# NPROC, DEPTH (20), KEEP_LAST (2), NUM_SHARDS (240), VOCAB (65536), NANOCHAT_BASE_DIR
set -euo pipefail
PY="${PY:-.venv/bin/python}"
PRESET="${PRESET:-auto}"
BASE_DIR="${NANOCHAT_BASE_DIR:-$HOME/.cache/nanochat}"

fail() { echo "preflight: $1" >&2; shift; if [ $# -gt 0 ]; then printf '  %s\n' "$@" >&2; fi; exit 1; }
gb() { awk -v b="$1" 'BEGIN { printf "%.1f", b / 1e9 }'; }

case "$PRESET" in
    cpu) echo cpu; exit 0 ;;
    auto|gpu) ;;
    *) fail "PRESET=$PRESET: use auto, gpu or cpu" ;;
esac

# -----------------------------------------------------------------------------
# The GPUs, one "index,name,MiB used,driver" line each. nvidia-smi prints its errors (no driver loaded)
# on stdout, so only its output on success counts, and only lines that start with an index
GPUS=""
if command -v nvidia-smi >/dev/null 2>&1; then
    GPUS=$(nvidia-smi --query-gpu=index,name,memory.used,driver_version --format=csv,noheader,nounits 2>&1) \
        && GPUS=$(sed 's/ *, */,/g' <<<"$GPUS" | grep -E '^[0-9]+,' || true) \
        || { echo "preflight: nvidia-smi failed: $(head -n1 <<<"$GPUS")" >&2; GPUS=""; }
fi
# torch (and so torchrun's ranks) sees only the GPUs CUDA_VISIBLE_DEVICES lists by index: count and check those
if [[ "${CUDA_VISIBLE_DEVICES:-}" =~ ^[0-9]+(,[0-9]+)*$ ]]; then
    GPUS=$(grep -E "^(${CUDA_VISIBLE_DEVICES//,/|})," <<<"$GPUS" || true)
fi
if [ -z "$GPUS" ]; then
    if [ "$PRESET" = gpu ]; then fail "PRESET=gpu but nvidia-smi lists no GPU (is the NVIDIA driver installed?)"; fi
    echo cpu; exit 0
fi
GPU_COUNT=$(wc -l <<<"$GPUS")
IFS=, read -r _ GPU_NAME _ DRIVER <<<"$(head -n1 <<<"$GPUS")"

# -----------------------------------------------------------------------------
# GPUs are there, so torch must see them: a silent fall back to the CPU preset would waste the node
TORCH_INFO=$("$PY" -c "import torch; print(torch.__version__, torch.version.cuda, int(torch.cuda.is_available()))" \
    2>/dev/null) || fail "$PY cannot import torch: run bash dev/setup.sh"
read -r TORCH TORCH_CUDA CUDA_OK <<<"$TORCH_INFO"
# The oldest driver a CUDA major version runs on (minor-version compatibility): NVIDIA's CUDA Toolkit
# release notes, table "CUDA Toolkit and Minimum Required Driver Version for CUDA Minor Version Compatibility"
case "$TORCH_CUDA" in
    13.*) MIN_DRIVER=580 ;;
    12.*) MIN_DRIVER=525 ;;
    11.*) MIN_DRIVER=450 ;;
    *) MIN_DRIVER="" ;;
esac
OLDER_TORCH="uv pip install torch --index-url https://download.pytorch.org/whl/cu126 (CUDA 12.6: a driver >= 525)"
if [ "$CUDA_OK" != 1 ]; then
    if [ "$TORCH_CUDA" = None ]; then
        fail "nvidia-smi lists $GPU_COUNT GPU(s) but torch $TORCH is a CPU-only build." \
             "Fix: a CUDA build of torch, e.g. $OLDER_TORCH; or PRESET=cpu"
    fi
    WHY="CUDA $TORCH_CUDA needs a driver >= ${MIN_DRIVER:-?}"
    if [ -n "$MIN_DRIVER" ] && [[ "${DRIVER%%.*}" =~ ^[0-9]+$ ]] && [ "${DRIVER%%.*}" -ge "$MIN_DRIVER" ]; then
        WHY="$WHY, which this one is: check CUDA_VISIBLE_DEVICES and that this container was given the GPUs"
    fi
    # uv sync --frozen (dev/setup.sh, run by speedrun.sh) would put the locked torch back: hence SKIP_SETUP=1
    fail "nvidia-smi lists $GPU_COUNT GPU(s) (driver $DRIVER) but torch $TORCH (CUDA $TORCH_CUDA) cannot use them: $WHY." \
         "Fix: update the NVIDIA driver to >= ${MIN_DRIVER:-?}; or install a torch built for an older CUDA:" \
         "    $OLDER_TORCH" \
         "then SKIP_SETUP=1 bash speedrun.sh (its setup's uv sync --frozen would reinstall the locked torch); or PRESET=cpu"
fi

# -----------------------------------------------------------------------------
# NPROC GPUs (default: all) must exist and be free: torchrun uses the first NPROC
if [ -n "${NPROC:-}" ]; then
    [[ "$NPROC" =~ ^[1-9][0-9]*$ ]] || fail "NPROC=$NPROC: a number of GPUs (1 or more)"
    [ "$NPROC" -le "$GPU_COUNT" ] || fail "NPROC=$NPROC but nvidia-smi lists $GPU_COUNT GPU(s)${CUDA_VISIBLE_DEVICES:+ in CUDA_VISIBLE_DEVICES}: set NPROC <= $GPU_COUNT"
fi
BUSY=()
while IFS=, read -r index _ used _; do
    # > 2 GiB: more than a CUDA context, so another process holds memory this run needs
    if [[ "$used" =~ ^[0-9]+$ ]] && [ "$used" -gt 2048 ]; then BUSY+=("GPU $index: $used MiB in use by another process (see nvidia-smi)"); fi
done < <(head -n "${NPROC:-$GPU_COUNT}" <<<"$GPUS")
if [ ${#BUSY[@]} -gt 0 ]; then fail "${BUSY[@]}"; fi

# -----------------------------------------------------------------------------
# Disk for the run: the shards still to download plus the checkpoints it keeps, plus slack
for knob in DEPTH KEEP_LAST NUM_SHARDS VOCAB; do
    [[ "${!knob:-0}" =~ ^[0-9]+$ ]] || fail "$knob=${!knob}: a whole number"
done
DEPTH="${DEPTH:-20}"; KEEP_LAST="${KEEP_LAST:-2}"; NUM_SHARDS="${NUM_SHARDS:-240}"; VOCAB="${VOCAB:-65536}"
# A shard is ~100 MB (nanochat/dataset.py; an estimate, sizes vary); +1: the validation shard
SHARD_BYTES=100000000
# the corpus's own folder, as nanochat/dataset.py names it: base_data (FineWeb-Edu), base_data_<name> for another
CORPUS="${NANOCHAT_CORPUS:-fineweb-edu}"; DATA_DIR="$BASE_DIR/base_data"; [ "$CORPUS" = fineweb-edu ] || DATA_DIR+="_$CORPUS"
shopt -s nullglob; SHARD_FILES=("$DATA_DIR"/*.parquet); shopt -u nullglob
HAVE_SHARDS=${#SHARD_FILES[@]}
MISSING_SHARDS=$(( NUM_SHARDS + 1 > HAVE_SHARDS ? NUM_SHARDS + 1 - HAVE_SHARDS : 0 ))
# A checkpoint of depth D (model dim 64*D): 12*D*dim^2 block weights, and the embedding and lm_head
# (V*dim each); fp32 weights, plus Muon's momentum (blocks) and AdamW's two moments (embedding, head)
DIM=$(( 64 * DEPTH ))
N_BLOCKS=$(( 12 * DEPTH * DIM * DIM ))
N_EMB=$(( 2 * VOCAB * DIM ))
CKPT_BYTES=$(( 4 * (N_BLOCKS + N_EMB) + 4 * N_BLOCKS + 8 * N_EMB ))
if [ "$KEEP_LAST" = 0 ]; then
    echo "preflight: KEEP_LAST=0 keeps every base checkpoint ($(gb $CKPT_BYTES) GB each): the disk check assumes 2" >&2
    KEEP_LAST=2
fi
# KEEP_LAST base checkpoints, one final one each of mid, SFT and DPO; slack: tokenizer, eval data, logs
SLACK_BYTES=5000000000
NEED=$(( MISSING_SHARDS * SHARD_BYTES + (KEEP_LAST + 3) * CKPT_BYTES + SLACK_BYTES ))
mkdir -p "$BASE_DIR"
FREE=$(( $(df -Pk "$BASE_DIR" | awk 'NR == 2 { print $4 }') * 1024 ))
if [ "$FREE" -lt "$NEED" ]; then
    fail "$BASE_DIR has $(gb $FREE) GB free but the run needs ~$(gb $NEED) GB: $MISSING_SHARDS shards of ~0.1 GB," \
         "$((KEEP_LAST + 3)) d$DEPTH checkpoints of $(gb $CKPT_BYTES) GB (KEEP_LAST=$KEEP_LAST base + mid, SFT, DPO), $(gb $SLACK_BYTES) GB slack." \
         "Fix: NANOCHAT_BASE_DIR on a bigger disk, or a lower KEEP_LAST (1 keeps only the newest base checkpoint)"
fi

echo "preflight: ${NPROC:-$GPU_COUNT} x $GPU_NAME, driver $DRIVER, torch $TORCH, $(gb $FREE) GB free of $(gb $NEED) GB needed" >&2
echo gpu
