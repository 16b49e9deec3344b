"""HTTP: the OpenAI-compatible server over the engine and the store (docs/SERVING.md)."""
