#!/usr/bin/env bash
# The main job on the embedded base model (SmolLM2-135M-Instruct), end to end.
# Run through `make demo`, which sets up .venv first. Uses a throwaway store in ./demo-store.
set -euo pipefail
export HF_HUB_OFFLINE=1
export PERSONA_HOME="${PERSONA_HOME:-$PWD/demo-store}"
rm -rf "$PERSONA_HOME"

echo "== bind a store to the embedded base (the first run converts the GGUF once, ~20 s)"
persona init
persona base

echo "== create one adapter per user and one per domain"
for user in alice bob carol; do persona create "user:$user"; done
persona create domain:finance --rank 16

echo "== what the store holds"
persona list
persona show user:alice
persona verify
