"""Adapters between persona's store and other engines (a top layer, like ``cli/`` and ``http/``).

- :mod:`persona.integrations.vllm`: a vLLM LoRA resolver plugin over a persona store.
"""
