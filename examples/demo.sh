#!/usr/bin/env bash
# The main job on the embedded base model (SmolLM2-135M-Instruct), end to end:
# create adapters, update one from interactions, compare it with the base, serve them over HTTP.
# Run through `make demo` (which sets up .venv first). Uses a throwaway store in ./demo-store.
set -euo pipefail
export HF_HUB_OFFLINE=1
export PERSONA_HOME="${PERSONA_HOME:-$PWD/demo-store}"
EX="$(cd "$(dirname "$0")" && pwd)/interactions"
rm -rf "$PERSONA_HOME"

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "bind a store to the embedded base (the first run converts the GGUF once, ~20 s)"
persona init
BASE="$(persona base --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')"

step "create one adapter per user and one per domain"
for user in alice bob carol; do persona create "user:$user"; done
persona create domain:finance --rank 16

step "update user:alice from her interactions (replayed past data in every batch, gated promotion)"
persona update user:alice --data "$EX/alice.jsonl" --epochs 4 --lr 2e-3
persona show user:alice

step "the same question to the base model and to alice's adapter"
Q="What's my dog's name?"
printf 'base        : '; persona generate "$BASE" "$Q" --max-new-tokens 24
printf 'user:alice  : '; persona generate user:alice "$Q" --max-new-tokens 24
printf 'user:bob    : '; persona generate user:bob "$Q" --max-new-tokens 24

step "log new interactions, then update from the pending queue"
persona log user:alice --data "$EX/alice-2.jsonl"
persona update user:alice --epochs 4 --lr 2e-3
Q2="Where do I work now?"
printf 'base        : '; persona generate "$BASE" "$Q2" --max-new-tokens 24
printf 'user:alice  : '; persona generate user:alice "$Q2" --max-new-tokens 24
printf 'alice (dog) : '; persona generate user:alice "$Q" --max-new-tokens 24

step "serve them: an OpenAI-compatible server, a token scoped to alice"
TOKEN="$(persona token create user:alice --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["token"])')"
PORT="${PERSONA_DEMO_PORT:-8765}"
persona serve --port "$PORT" > "$PERSONA_HOME/serve.log" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true' EXIT
python3 - "$PORT" <<'PY'
import sys, time, urllib.request
for _ in range(240):
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/healthz", timeout=1)
        break
    except OSError:
        time.sleep(0.5)
PY
python3 "$(dirname "$EX")/http_client.py" "http://127.0.0.1:$PORT" "$TOKEN" "$Q"
kill $SERVER

step "integrity"
persona verify
