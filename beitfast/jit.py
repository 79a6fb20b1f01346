"""The one place Numba is configured. Set BEITFAST_NO_JIT=1 (or Numba's own
NUMBA_DISABLE_JIT=1) to run every @njit function as plain Python for debugging."""
from __future__ import annotations

import os

if os.environ.get("BEITFAST_NO_JIT") == "1":
    os.environ["NUMBA_DISABLE_JIT"] = "1"

import numba  # noqa: E402  (must see the variable above)

prange = numba.prange


def njit(fn=None, **kwargs):
    """numba.njit with the project's defaults: cached to disk, so compiled code survives
    between processes (loader workers, tests)."""
    kwargs.setdefault("cache", True)
    if fn is None:
        return lambda f: numba.njit(**kwargs)(f)
    return numba.njit(**kwargs)(fn)
