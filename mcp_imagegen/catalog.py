"""Which models each endpoint serves, and which endpoint and model a request goes to.

The catalog merges three sources per endpoint: the provider manifest, live discovery (cached for
`discovery_ttl_s`) and the endpoint's `models` allowlist from the configuration. Routing picks the
endpoint and model for a request and lists the other endpoints that serve the same model, so the
service can fail over to them.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .config import EndpointConfig, Settings
from .errors import ImageGenError, InvalidRequestError, ModelNotFoundError
from .manifests import Manifest, ModelSpec, load_manifest
from .models import Capability, ModelInfo, Operation

if TYPE_CHECKING:
    from .dialects import DiscoveredModel
    from .gateway import GatewayClient

log = logging.getLogger("mcp_imagegen.catalog")


@dataclass(frozen=True, slots=True)
class Route:
    endpoint: EndpointConfig
    manifest: Manifest
    model: ModelSpec


@dataclass(slots=True)
class _Discovered:
    at: float
    specs: dict[str, ModelSpec]


def _needed(operation: Operation, has_mask: bool, n_images: int) -> set[Capability]:
    need: set[Capability] = {operation}
    if has_mask:
        need.add("mask")
    if n_images > 1:
        need.add("multi_image")
    return need


class ModelCatalog:
    def __init__(self, settings: Settings, gateway: GatewayClient | None) -> None:
        self._settings = settings
        self._gateway = gateway
        self._discovered: dict[str, _Discovered] = {}

    # --- what each endpoint serves ------------------------------------------------------------

    def specs(self, endpoint: EndpointConfig) -> list[ModelSpec]:
        """The models this endpoint serves, as far as is known now."""
        return list(self._specs(endpoint).values())

    def _specs(self, endpoint: EndpointConfig) -> dict[str, ModelSpec]:
        manifest = load_manifest(endpoint.provider)
        specs = {m.id: m for m in manifest.models}
        found = self._discovered.get(endpoint.name)
        if found:
            for model_id, spec in found.specs.items():
                specs[model_id] = spec
        if endpoint.models is not None:
            allowed: dict[str, ModelSpec] = {}
            for model_id in endpoint.models:
                spec = specs.get(model_id) or manifest.model(model_id)
                allowed[model_id] = spec or ModelSpec(id=model_id, capabilities=["generate"])
            return allowed
        return specs

    def _merge_discovered(self, manifest: Manifest, discovered: list[DiscoveredModel]) -> dict[str, ModelSpec]:
        specs: dict[str, ModelSpec] = {}
        for d in discovered:
            base = manifest.model(d.id)
            update: dict[str, object] = {}
            if d.capabilities:
                update["capabilities"] = list(d.capabilities)
            if d.sizes:
                update["sizes"] = list(d.sizes)
            if d.max_n:
                update["max_n"] = d.max_n
            if d.max_input_images:
                update["max_input_images"] = d.max_input_images
            if d.usd_per_image is not None:
                update["usd_per_image"] = d.usd_per_image
            if base is None:
                base = ModelSpec(id=d.id, capabilities=list(d.capabilities or ["generate"]))
            specs[d.id] = base.model_copy(update=update)
        return specs

    async def refresh(self, endpoint: EndpointConfig, *, force: bool = False) -> None:
        """Discover the endpoint's models unless a fresh enough list is cached."""
        manifest = load_manifest(endpoint.provider)
        if manifest.discovery is None or self._gateway is None:
            return
        cached = self._discovered.get(endpoint.name)
        if cached and not force and time.monotonic() - cached.at < self._settings.discovery_ttl_s:
            return
        from .dialects import decode_models

        spec = manifest.discovery
        body = await self._gateway.get_json(endpoint, manifest, spec.path, spec.relative_to, spec.auth)
        self._discovered[endpoint.name] = _Discovered(
            at=time.monotonic(), specs=self._merge_discovered(manifest, decode_models(manifest, body))
        )

    async def list_models(
        self, *, capability: Capability | None = None, endpoint: str | None = None, refresh: bool = False
    ) -> tuple[list[ModelInfo], list[str]]:
        """Models across endpoints, and warnings for endpoints whose discovery failed."""
        warnings: list[str] = []
        endpoints = [self.endpoint(endpoint)] if endpoint else self._settings.endpoints
        infos: list[ModelInfo] = []
        for ep in endpoints:
            if refresh or ep.name not in self._discovered:
                try:
                    await self.refresh(ep, force=refresh)
                except ImageGenError as exc:
                    warnings.append(f"model discovery on endpoint {ep.name!r} failed: {exc.agent_text()}")
            manifest = load_manifest(ep.provider)
            discovered = self._discovered.get(ep.name)
            for spec in self._specs(ep).values():
                if capability and capability not in spec.capabilities:
                    continue
                source = "configured" if ep.models is not None else "manifest"
                if discovered and spec.id in discovered.specs:
                    source = "discovered"
                infos.append(
                    ModelInfo(
                        id=spec.id,
                        endpoint=ep.name,
                        provider=ep.provider,
                        capabilities=list(spec.capabilities),
                        sizes=list(spec.sizes) if spec.sizes else None,
                        max_n=spec.max_n,
                        max_input_images=spec.max_input_images if "edit" in spec.capabilities else None,
                        parameters=list(spec.knobs),
                        source=source,
                    )
                )
            if manifest.unknown_models and ep.models is None and not (discovered and discovered.specs):
                warnings.append(
                    f"endpoint {ep.name!r} ({manifest.name}) serves models this server cannot list; "
                    "name one with the model argument or list them in the endpoint's `models` setting"
                )
        return infos, warnings

    # --- routing ------------------------------------------------------------------------------

    def endpoint(self, name: str) -> EndpointConfig:
        ep = self._settings.endpoint(name)
        if ep is None:
            names = ", ".join(e.name for e in self._settings.endpoints)
            raise InvalidRequestError(f"unknown endpoint {name!r}; configured endpoints: {names}")
        return ep

    def _ordered(self, endpoint: str | None) -> list[EndpointConfig]:
        if endpoint:
            return [self.endpoint(endpoint)]
        # Stable sort: equal priorities keep the configuration's order.
        return sorted(self._settings.endpoints, key=lambda e: -e.priority)

    async def routes(
        self,
        *,
        model: str | None,
        endpoint: str | None,
        operation: Operation,
        has_mask: bool = False,
        n_images: int = 0,
    ) -> list[Route]:
        """Candidate routes, best first: the first is used, the rest serve failover."""
        need = _needed(operation, has_mask, n_images)
        candidates = self._ordered(endpoint)
        routes: list[Route] = []
        if model:
            for ep in candidates:
                spec = await self._find(ep, model)
                if spec is not None:
                    routes.append(Route(ep, load_manifest(ep.provider), spec))
            if not routes:
                where = f"endpoint {endpoint!r}" if endpoint else "any configured endpoint"
                served = self._served_summary(candidates)
                raise ModelNotFoundError(f"model {model!r} is not served by {where}. Available: {served}")
            capable = [r for r in routes if need <= set(r.model.capabilities)]
            if not capable:
                raise InvalidRequestError(self._capability_message(model, need, candidates))
            return capable
        for ep in candidates:
            spec = self._default_model(ep, need)
            if spec is not None:
                routes.append(Route(ep, load_manifest(ep.provider), spec))
        if not routes:
            raise InvalidRequestError(self._capability_message(None, need, candidates))
        # Without an explicit model, failover only makes sense to the same model elsewhere.
        first = routes[0]
        same = [r for r in routes[1:] if r.model.id == first.model.id]
        return [first, *same]

    async def listed_price(self, ep: EndpointConfig, model: str) -> float | None:
        """The per-image price the gateway's discovery lists for a model, if it lists one (spending
        limits want it; the discovered list is cached for discovery_ttl_s)."""
        if load_manifest(ep.provider).discovery is None:
            return None
        try:
            await self.refresh(ep)
        except ImageGenError as exc:
            log.warning("discovery on %s failed: %s", ep.name, exc.message)
        spec = self._specs(ep).get(model)
        return spec.usd_per_image if spec is not None else None

    async def _find(self, ep: EndpointConfig, model: str) -> ModelSpec | None:
        spec = self._specs(ep).get(model)
        if spec is None and ep.name not in self._discovered:
            try:
                await self.refresh(ep)
            except ImageGenError as exc:
                log.warning("discovery on %s failed: %s", ep.name, exc.message)
            spec = self._specs(ep).get(model)
        if spec is None and ep.models is None:
            spec = load_manifest(ep.provider).model(model)  # the unknown-model template, if any
        return spec

    def _default_model(self, ep: EndpointConfig, need: set[Capability]) -> ModelSpec | None:
        specs = self._specs(ep)
        manifest = load_manifest(ep.provider)
        preferred = [ep.models[0]] if ep.models else []
        if manifest.default_model:
            preferred.append(manifest.default_model)
        for model_id in [*preferred, *specs]:
            spec = specs.get(model_id)
            if spec is not None and need <= set(spec.capabilities):
                return spec
        return None

    def _served_summary(self, endpoints: list[EndpointConfig]) -> str:
        parts = []
        for ep in endpoints:
            ids = list(self._specs(ep))
            parts.append(f"{ep.name}: {', '.join(ids) if ids else '(any model the gateway has)'}")
        return "; ".join(parts) + ". Call list_models for details."

    def _capability_message(self, model: str | None, need: set[Capability], endpoints: list[EndpointConfig]) -> str:
        wanted = " + ".join(sorted(need))
        able = [
            f"{spec.id} on {ep.name}"
            for ep in endpoints
            for spec in self._specs(ep).values()
            if need <= set(spec.capabilities)
        ]
        subject = f"model {model!r}" if model else "no configured model"
        tail = f" Models that can: {', '.join(able)}." if able else " No configured model can."
        verb = "cannot do" if model else "can do"
        return f"{subject} {verb} {wanted}.{tail}"
