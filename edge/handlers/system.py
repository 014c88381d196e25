"""Health, readiness, the model list, the caller's account and the OpenAPI document."""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web

from edge.flow import credential_from
from edge.keys import REGISTRY, REQUEST_ID, SETTINGS, UPSTREAMS
from edge.readiness import model_states
from edge.responses import json_response
from services.common.money import format_credits
from services.common.registry import ModelSpec, Registry


async def healthz(request: web.Request) -> web.Response:
    """Alive: the process answers."""
    return json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Ready: every service of the catalog answers its health check with SERVING (a capability
    does once its default model is loaded). ``models`` gives each model's load state
    (``edge.readiness``): a model still loading answers 503 ``maintenance_mode`` meanwhile."""
    upstreams = request.app[UPSTREAMS]
    services, models = await asyncio.gather(
        upstreams.health(), model_states(upstreams, request.app[SETTINGS], request[REQUEST_ID])
    )
    ready = all(services.values())
    return json_response(
        {"status": "ready" if ready else "not_ready", "services": services, "models": models},
        status=200 if ready else 503,
    )


def model_entry(spec: ModelSpec, created: int) -> dict[str, Any]:
    """One model as ``/v1/models`` lists it: OpenAI's model object (id, object, created,
    owned_by) with Kiln's details."""
    return {
        "id": spec.id,
        "object": "model",
        "created": created,
        "owned_by": "kiln",
        "description": spec.description,
        "capability": spec.capability,
        "capabilities": list(spec.capabilities),
        "aliases": list(spec.aliases),
        "limits": spec.limits.model_dump(),
        "defaults": spec.defaults.model_dump(),
        "pricing": {
            "formula": spec.price.describe(),
            "base_credits": str(spec.price.base),
            "credits_per_megapixel": str(spec.price.per_megapixel),
            "reference_steps": spec.price.reference_steps,
            "premium_only": spec.price.premium_only,
        },
    }


async def list_models(request: web.Request) -> web.Response:
    """Every model with its aliases, capability, limits, defaults and price formula."""
    registry = request.app[REGISTRY]
    created = registry_time(registry)
    models = [model_entry(spec, created) for spec in registry.models]
    return json_response({"object": "list", "data": models})


def registry_time(registry: Registry) -> int:
    """A model's ``created``: when the registry file that declares it last changed (Unix
    seconds; 0 if the file is gone). Models have no birth date of their own here."""
    try:
        return int(registry.path.stat().st_mtime)
    except OSError:
        return 0


async def get_account(request: web.Request) -> web.Response:
    """The authenticated caller's account and balance (no charge)."""
    account = await request.app[UPSTREAMS].billing.authenticate(credential_from(request), request[REQUEST_ID])
    return json_response(
        {
            "id": account.id,
            "name": account.name,
            "premium": account.premium,
            "balance": format_credits(account.balance_hundredths),
            "held": format_credits(account.held_hundredths),
        }
    )
