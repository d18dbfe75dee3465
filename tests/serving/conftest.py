"""Triton, for the serving tests that run our Triton kernel in its CPU interpreter (`test_triton_decode.py`).

Triton decides when `triton.language` is imported whether its library functions (`tl.zeros`, `tl.max`, ...) run in
the interpreter, so where no GPU is visible it is imported here, first, with `TRITON_INTERPRET=1`; the variable is then
unset again, so that the engine (which reads it to allow the kernel on CPU) only sees it in the tests that set it.
On a GPU machine Triton is left alone: the kernel is compiled there.
"""
from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        import triton.language  # noqa: F401 - imported for its side effect: interpreted library functions
    except ImportError:  # the serving image's packages alone: the Triton tests skip
        pass
    finally:
        if previous is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = previous
