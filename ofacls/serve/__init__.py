"""`ofacls serve`: the classifier as an HTTP service with dynamic batching.

This module imports nothing heavy: `require_serve` tells whether the `serve`
extra is installed; `ofacls.serve.app` holds the Starlette application.
"""

from __future__ import annotations

from ofacls.errors import UsageError

INSTALL_HINT = "pip install 'ofacls[serve]'"


def require_serve() -> None:
    """UsageError naming the extra when Starlette, uvicorn or python-multipart is missing."""
    try:
        import multipart  # noqa: F401
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise UsageError(f"ofacls serve needs its extra: {INSTALL_HINT}") from None
