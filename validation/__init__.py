"""Offline validation of rendered stacks: Kubernetes schemas, CRD shapes, checkov, and cross-reference checks.

Each layer is a module with one entry point that takes manifests (dicts, as `render.py` produces them) and
returns `Finding`s; an empty list means the layer passed. `python -m validation STACK_OR_DIR` runs them all.
"""
from validation.findings import Finding

__all__ = ["Finding"]
