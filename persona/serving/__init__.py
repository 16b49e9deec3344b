"""Serving: the engine that batches generation for many adapters over one base (docs/SERVING.md)."""
