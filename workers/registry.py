"""Moved to contract.registry (model lookup is shared with the producer): import it from there. Kept only while
workers/engine.py, its last importer, still imports ModelSpec from here; delete this file with that line."""
from contract.registry import ModelSpec

__all__ = ["ModelSpec"]
