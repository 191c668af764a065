"""GET /v1/methods (a JSON schema per method) and GET /v1/base-models."""

from __future__ import annotations

from fastapi import APIRouter

from api.deps import SettingsDep
from core.bases.allow_list import list_base_models
from core.spec.job import method_schemas

router = APIRouter(prefix="/v1", tags=["catalog"])


@router.get("/methods")
def list_methods() -> dict:
    return {"object": "list", "data": list(method_schemas().values()), "has_more": False}


@router.get("/base-models")
def base_models(settings: SettingsDep) -> dict:
    return {"object": "list", "data": [m.to_public() for m in list_base_models(settings)], "has_more": False}
