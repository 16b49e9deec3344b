"""Composition: merging adapters into one, and routing a prompt to a domain adapter (docs/ARCHITECTURE.md)."""
