"""The FastAPI adapter: routes built without importing ``pydantic.v1``.

FastAPI refuses models of pydantic's v1 API. To tell, it imports ``pydantic.v1`` the
first time it builds a route's parameters, and keeps it: 1.3-1.4 MB in every frontend,
for a check whose answer is always "no" here (docs/performance.md, "Fast paths"). A
class or object can only be a ``pydantic.v1`` model once ``pydantic.v1`` has been
imported, so the fast path asks that first: the same answers, and ``pydantic.v1`` stays
out of a process that never uses it. This is the only code that touches FastAPI's
private ``fastapi._compat``; with ``THOUGHTWIRE_FAST_PATHS=0`` or an untested FastAPI,
FastAPI's own checks run.
"""

from __future__ import annotations

import sys
from typing import Any

from thoughtwire.shared.fastpaths import Adapter

FASTAPI = Adapter("fastapi", {"fastapi": "0.165.0"})


def _v1_model_class(cls: Any) -> bool:
    """Whether ``cls`` is a ``pydantic.v1`` model class, without importing ``pydantic.v1``."""
    from fastapi._compat.shared import lenient_issubclass

    model = _v1_base_model()
    return model is not None and lenient_issubclass(cls, model)


def _v1_model_instance(obj: Any) -> bool:
    """Whether ``obj`` is a ``pydantic.v1`` model, without importing ``pydantic.v1``."""
    model = _v1_base_model()
    return model is not None and isinstance(obj, model)


def _v1_base_model() -> type | None:
    """``pydantic.v1.BaseModel`` once ``pydantic.v1`` is imported (the module may be
    half imported by another thread: then no v1 model exists yet either)."""
    return getattr(sys.modules.get("pydantic.v1"), "BaseModel", None)


def install(switch: bool) -> bool:
    """Take the fast path when ``switch`` is on and FastAPI is a tested release; say whether.

    Call it before any route is built (before :mod:`thoughtwire.api.app` is imported):
    a route built earlier has imported ``pydantic.v1`` already.
    """
    if not FASTAPI.enabled(switch):
        return False
    from fastapi import encoders
    from fastapi._compat import shared

    shared.is_pydantic_v1_model_class = _v1_model_class
    shared.is_pydantic_v1_model_instance = _v1_model_instance
    encoders.is_pydantic_v1_model_instance = _v1_model_instance  # bound by name at import
    return True
