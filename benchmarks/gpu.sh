#!/usr/bin/env bash
# The GPU column of docs/BENCHMARKS.md in one go: the serve and update benchmarks with --device cuda.
#
#   bash benchmarks/gpu.sh prepare      # where the embedded base is installed and PyPI is reachable: fills .gpu/
#   bash benchmarks/gpu.sh run          # on the GPU machine, from the repository root: results under $OUT
#
# Assumptions about the GPU machine (checked on none yet; see docs/BENCHMARKS.md):
# - python3 there has torch with CUDA, transformers, peft, safetensors, accelerate, huggingface_hub,
#   click, filelock, tqdm, anyio, h11, prometheus-client (the device image of this workplace does).
# - It reaches no network, not even a package registry. What it lacks travels in .gpu/wheels
#   (made by `prepare`: fastapi, starlette, pydantic, uvicorn, llguidance and their missing needs,
#   cp312 manylinux x86_64 wheels) and is installed offline into /tmp/site. Where .gpu/wheels is
#   absent, `run` falls back to `pip install` from the registry (a machine that reaches one).
# - The embedded base (a 98 MB GGUF in a pip package) is too big to carry, so both benchmarks run
#   on random weights of its exact architecture (.gpu/arch: config.json + tokenizer, 3.4 MB, from
#   `serve_engine.py --save-arch`). Times, tokens/s and memory hold; losses and text are noise.
#
# Time: `run` is sized for one 10-minute device call (each step has its own timeout, ~9 min in all;
# a step cut short still leaves what it printed). Steps: serve_engine (bf16: correctness, cold load,
# memory, throughput at 8 and 32 rows; float32 throughput), serve_http (16 clients), update (three
# sequential updates vs plain Trainer+PEFT, both on the GPU), update_many (8 and 32 users, batched vs one after
# another, random weights too: times and memory only). `run serve` or `run update` runs one half.
#
# Overrides (a dry run on a CPU: `DEVICE=cpu DTYPE=float32 QUICK=1 NO_INSTALL=1 ARCH=DIR OUT=DIR bash benchmarks/gpu.sh run`):
#   DEVICE (cuda), DTYPE (bfloat16), ARCH (.gpu/arch), OUT (./gpu-results), PY (python3), QUICK, NO_INSTALL (unset).
set -uo pipefail

cd "$(dirname "$0")/.."
PY=${PY:-python3}
ARCH=${ARCH:-.gpu/arch}
DEVICE=${DEVICE:-cuda}
DTYPE=${DTYPE:-bfloat16}
OUT=${OUT:-$PWD/gpu-results}
WHEELS=(fastapi starlette pydantic pydantic-core annotated-types typing-inspection uvicorn llguidance)

prepare() {
    local exclude
    exclude=$(git rev-parse --git-path info/exclude) && mkdir -p "$(dirname "$exclude")"
    grep -qx '/.gpu/' "$exclude" 2>/dev/null || echo '/.gpu/' >>"$exclude"  # .gpu/ travels as a carried path
    mkdir -p .gpu/wheels
    "$PY" benchmarks/serve_engine.py --save-arch .gpu/arch || exit 1
    # the versions installed here, which the tests passed with (one version of each: two stop the install)
    local pinned
    pinned=$("$PY" -c "import importlib.metadata as m, sys; print(' '.join(f'{n}=={m.version(n)}' for n in sys.argv[1:]))" \
        "${WHEELS[@]}") || exit 1
    rm -f .gpu/wheels/*.whl
    local platforms=()
    for n in 17 24 27 28 31 34 35 39; do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
    # shellcheck disable=SC2086
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux2014_x86_64 "${platforms[@]}" -d .gpu/wheels $pinned || exit 1
    du -sh .gpu
    echo "now, on the GPU machine: bash benchmarks/gpu.sh run   (carry .gpu with the working tree)"
}

install() {
    if [ -n "${NO_INSTALL:-}" ]; then export PYTHONPATH="$PWD"; return; fi  # a dry run where all is installed
    if ls .gpu/wheels/*.whl >/dev/null 2>&1; then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
            .gpu/wheels/*.whl || exit 1
        export PYTHONPATH="/tmp/site:$PWD"
    else
        "$PY" -m pip install -q "${WHEELS[@]}" || exit 1
        export PYTHONPATH="$PWD"
    fi
}

step() {  # step NAME SECONDS COMMAND...: its output to $OUT/NAME.md and to the log
    local name=$1 limit=$2
    shift 2
    echo "== $name (at most ${limit}s): $*" | tee -a "$OUT/gpu.log"
    local start=$SECONDS
    timeout "$limit" "$@" >"$OUT/$name.md" 2>>"$OUT/gpu.log"
    local code=$?
    echo "== $name: exit $code after $((SECONDS - start))s" | tee -a "$OUT/gpu.log"
}

run() {
    local what=${1:-all}
    mkdir -p "$OUT"
    install
    export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
    export PERSONA_CACHE=${PERSONA_CACHE:-/tmp/persona-cache}
    {
        date -u
        nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 || true
        "$PY" -c "import torch, transformers, peft; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'available', torch.cuda.is_available(), '| transformers', transformers.__version__, '| peft', peft.__version__)"
    } >"$OUT/env.txt" 2>&1
    cat "$OUT/env.txt"
    local place=(--device "$DEVICE" --random-base "$ARCH" --threads 4)
    local sizes=8,32 tokens=32 repeats=3 users=16 update=()
    local many_users=8,32
    if [ -n "${QUICK:-}" ]; then sizes=8; tokens=2; repeats=1; users=2; update=(--epochs 1); many_users=2; fi
    if [ "$what" = all ] || [ "$what" = serve ]; then
        step serve_engine 240 "$PY" benchmarks/serve_engine.py "${place[@]}" --dtype "$DTYPE" --adapters "$sizes" \
            --tokens "$tokens" --repeats "$repeats" --parts dacb --check-dtypes "float32,$DTYPE"
        step serve_engine_fp32 75 "$PY" benchmarks/serve_engine.py "${place[@]}" --dtype float32 --adapters "$sizes" \
            --tokens "$tokens" --repeats "$repeats" --parts b
        step serve_http 90 "$PY" benchmarks/serve_http.py "${place[@]}" --dtype "$DTYPE" --users "$users" --tokens "$tokens"
    fi
    if [ "$what" = all ] || [ "$what" = update ]; then
        step update 150 "$PY" benchmarks/update.py "${place[@]}" --dtype "$DTYPE" "${update[@]}"
        step update_many 240 "$PY" benchmarks/update_many.py --device "$DEVICE" --dtype "$DTYPE" --random-base "$ARCH" \
            --users "$many_users" "${update[@]}"
    fi
    echo "results in $OUT: $(ls "$OUT" | tr '\n' ' ')"
}

case "${1:-}" in
    prepare) prepare ;;
    run) shift; run "$@" ;;
    *) sed -n '2,26p' "$0"; exit 2 ;;
esac
