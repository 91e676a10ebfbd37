"""Which models each endpoint serves, and which endpoint and model a request goes to.

What each endpoint serves comes from live discovery (cached for `discovery_ttl_s`) where the
gateway has it, else from its manifest, plus the models named in the endpoint's configuration
(`models` allowlist, `model_overrides`). What is true of each model is resolution.py's answer.
Routing picks the endpoint and model for a request and lists the other endpoints that serve the
same model, so the service can fail over to them. A model shut down by its provider is not
offered; asking for it gets an error naming one that works.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import anyio

from .config import EndpointConfig, Settings
from .errors import AuthenticationError, ImageGenError, InvalidRequestError, ModelNotFoundError
from .learning import LearnedFacts, Lesson
from .manifests import Manifest, ModelSpec, load_manifest
from .models import Capability, ModelInfo, Operation
from .resolution import Belief, describe_sources, family_for, resolve

if TYPE_CHECKING:
    from .dialects import DiscoveredModel
    from .gateway import GatewayClient

log = logging.getLogger("mcp_imagegen.catalog")
RELIST_AFTER_S = 60.0  # a model list this old is read again when asked for a model it lacks


@dataclass(frozen=True, slots=True)
class Route:
    endpoint: EndpointConfig
    manifest: Manifest
    belief: Belief

    @property
    def model(self) -> ModelSpec:
        return self.belief.spec


@dataclass(slots=True)
class _Discovered:
    at: float
    models: dict[str, DiscoveredModel]


@dataclass(frozen=True, slots=True)
class _Resolved:
    """A belief and the inputs it was resolved from. Resolving costs about a millisecond of the
    event loop per model, and routing and checking a call look at every model of the endpoint, so
    a belief is reused while its inputs are the same objects: a refreshed discovery, a replaced
    override or a new (or expired) lesson makes the next call resolve again."""

    manifest: Manifest
    discovered: DiscoveredModel | None
    override: ModelSpec | None
    lessons: tuple[Lesson, ...]
    belief: Belief

    def fits(
        self,
        manifest: Manifest,
        discovered: DiscoveredModel | None,
        override: ModelSpec | None,
        lessons: tuple[Lesson, ...],
    ) -> bool:
        return (
            self.manifest is manifest
            and self.discovered is discovered
            and self.override is override
            and self.lessons == lessons
        )


RESOLVED_KEPT = 2048  # beliefs kept; agents may name any model on some gateways, so it is bounded


def missing_key_error(endpoint: EndpointConfig, manifest: Manifest) -> AuthenticationError | None:
    """The error for an endpoint whose gateway needs a key that is not set, else None.

    Checked before anything is sent to such an endpoint (discovery included, even where the
    gateway lists its models without a key): a request that can only fail is not worth making.
    """
    if endpoint.api_key is not None and endpoint.api_key.get_secret_value():
        return None
    if manifest.transport != "http" or manifest.auth.scheme == "none" or not manifest.auth.required:
        return None
    var = endpoint.api_key_env or manifest.key_env
    how = f"set {var}" if var else f"set api_key_env for endpoint {endpoint.name!r} and that variable"
    return AuthenticationError(
        f"endpoint {endpoint.name!r} needs an API key and none is set: {how}; nothing was sent",
        endpoint=endpoint.name,
    )


def _needed(operation: Operation, has_mask: bool, n_images: int) -> set[Capability]:
    need: set[Capability] = {operation}
    if has_mask:
        need.add("mask")
    if n_images > 1:
        need.add("multi_image")
    return need


def _natural(belief: Belief) -> list[object]:
    # "gpt-image-2.5" before "gpt-image-2.10": numbers compare as numbers.
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", belief.id)]


def _can(belief: Belief, need: set[Capability]) -> bool:
    return need <= set(belief.spec.capabilities or ())


class ModelCatalog:
    def __init__(self, settings: Settings, gateway: GatewayClient | None, learned: LearnedFacts | None = None) -> None:
        self._settings = settings
        self._gateway = gateway
        self._discovered: dict[str, _Discovered] = {}
        self._tried: set[str] = set()  # endpoints whose discovery was attempted (even if it failed)
        self._discovery_locks: dict[str, anyio.Lock] = {}
        # (endpoint, model) -> when the gateway said the model is not there: not sent again
        # until discovery is due again (a second try would only fail the same way).
        self._gone_at: dict[tuple[str, str], float] = {}
        self._resolved: dict[tuple[str, str], _Resolved] = {}  # (endpoint, model) -> its last belief
        self.learned = learned or LearnedFacts(None)

    # --- what is true of a model ---------------------------------------------------------------

    def belief(self, endpoint: EndpointConfig, model_id: str) -> Belief:
        """What is believed about `model_id` on `endpoint`, whether or not it is served there."""
        found = self._discovered.get(endpoint.name)
        manifest = load_manifest(endpoint.provider)
        discovered = found.models.get(model_id) if found else None
        override = endpoint.model_overrides.get(model_id)
        lessons = tuple(self.learned.lessons(endpoint.name, model_id))
        key = (endpoint.name, model_id)
        kept = self._resolved.get(key)
        if kept is not None and kept.fits(manifest, discovered, override, lessons):
            return kept.belief
        belief = resolve(model_id, manifest, discovered=discovered, override=override, lessons=lessons)
        if len(self._resolved) >= RESOLVED_KEPT:
            self._resolved.clear()
        self._resolved[key] = _Resolved(manifest, discovered, override, lessons, belief)
        return belief

    # --- what each endpoint serves ------------------------------------------------------------

    def _served_ids(self, endpoint: EndpointConfig) -> list[str]:
        if endpoint.models is not None:
            return list(endpoint.models)
        found = self._discovered.get(endpoint.name)
        # Discovery is the gateway's own list of what it serves now; without it, the manifest's.
        manifest = load_manifest(endpoint.provider)
        ids = list(found.models) if found else [m.id for m in manifest.models]
        if not found and manifest.default_model and manifest.default_model not in ids:
            ids.insert(0, manifest.default_model)  # the current default, known by its family
        ids += [i for i in endpoint.model_overrides if i not in ids]
        return ids

    def beliefs(self, endpoint: EndpointConfig, *, with_shut_down: bool = False) -> list[Belief]:
        """The models this endpoint serves, as far as is known now (shut-down ones left out)."""
        out = [self.belief(endpoint, i) for i in self._served_ids(endpoint)]
        return out if with_shut_down else [b for b in out if not b.shut_down()]

    def specs(self, endpoint: EndpointConfig) -> list[ModelSpec]:
        return [b.spec for b in self.beliefs(endpoint)]

    async def refresh(self, endpoint: EndpointConfig, *, force: bool = False) -> None:
        """Discover the endpoint's models unless a fresh enough list is cached."""
        manifest = load_manifest(endpoint.provider)
        if manifest.discovery is None or self._gateway is None or missing_key_error(endpoint, manifest):
            return  # (list_models says which key is missing)
        cached = self._discovered.get(endpoint.name)
        if cached and not force and time.monotonic() - cached.at < self._settings.discovery_ttl_s:
            return
        from .dialects import decode_models

        self._tried.add(endpoint.name)
        spec = manifest.discovery
        body = await self._gateway.get_json(endpoint, manifest, spec.path, spec.relative_to, spec.auth)
        models = {d.id: d for d in decode_models(manifest, body)}
        self._discovered[endpoint.name] = _Discovered(at=time.monotonic(), models=models)

    async def _discover_once(self, endpoint: EndpointConfig) -> None:
        # Calls arriving together wait for one discovery instead of routing without it.
        lock = self._discovery_locks.setdefault(endpoint.name, anyio.Lock())
        async with lock:
            if endpoint.name in self._tried or endpoint.name in self._discovered:
                return
            try:
                await self.refresh(endpoint)
            except ImageGenError as exc:
                log.warning("discovery on %s failed: %s", endpoint.name, exc.message)

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
            missing = missing_key_error(ep, manifest)
            if missing is not None:
                warnings.append(f"{missing.message} (its models are listed from its manifest)")
            discovered = self._discovered.get(ep.name)
            for belief in self.beliefs(ep):
                spec = belief.spec
                if capability and capability not in (spec.capabilities or ()):
                    continue
                infos.append(self._info(ep, belief, discovered))
            if manifest.unknown_models and ep.models is None and not (discovered and discovered.models):
                warnings.append(
                    f"endpoint {ep.name!r} ({manifest.name}) serves models this server cannot list; "
                    "name one with the model argument or list them in the endpoint's `models` setting"
                )
        return infos, warnings

    def _info(self, ep: EndpointConfig, belief: Belief, discovered: _Discovered | None) -> ModelInfo:
        from .checks import describe_sizes

        spec = belief.spec
        source = "manifest"
        if ep.models is not None or spec.id in ep.model_overrides:
            source = "configured"
        elif discovered and spec.id in discovered.models:
            source = "discovered"
        notes = list(belief.notes)
        deprecation = belief.deprecation(instead=self.successor(ep, belief))
        if deprecation:
            notes.insert(0, deprecation)
        rules = describe_sizes(spec) if spec.size_rule is not None else None
        return ModelInfo(
            id=spec.id,
            endpoint=ep.name,
            provider=ep.provider,
            capabilities=list(spec.capabilities or ()),
            sizes=list(spec.sizes) if spec.sizes else None,
            size_rules=rules or None,
            max_n=spec.max_n,
            max_input_images=spec.max_input_images if "edit" in (spec.capabilities or ()) else None,
            parameters=list(spec.knobs or ()),
            source=source,
            family=belief.family,
            facts=describe_sources(belief),
            notes=notes,
        )

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
        for ep in candidates:
            await self._discover_if_needed(ep, model)
        routes: list[Route] = []
        if model:
            gone: list[tuple[EndpointConfig, Belief]] = []
            for ep in candidates:
                belief = self._find(ep, model)
                if belief is None:
                    continue
                if self._gone(ep, belief):
                    gone.append((ep, belief))
                    continue
                routes.append(Route(ep, load_manifest(ep.provider), belief))
            if not routes and gone:
                raise ModelNotFoundError(self._shut_down_message(model, gone, need))
            if not routes:
                where = f"endpoint {endpoint!r}" if endpoint else "any configured endpoint"
                served = self._served_summary(candidates)
                raise ModelNotFoundError(f"model {model!r} is not served by {where}. Available: {served}")
            capable = [r for r in routes if _can(r.belief, need)]
            if not capable:
                raise InvalidRequestError(self._capability_message(model, need, candidates))
            return capable
        for ep in candidates:
            belief = self.default_model(ep, need)
            if belief is not None:
                routes.append(Route(ep, load_manifest(ep.provider), belief))
        if not routes:
            raise InvalidRequestError(self._capability_message(None, need, candidates))
        # Without an explicit model, failover only makes sense to the same model elsewhere.
        first = routes[0]
        same = [r for r in routes[1:] if r.model.id == first.model.id]
        return [first, *same]

    async def _discover_if_needed(self, ep: EndpointConfig, model: str | None) -> None:
        """Ask the gateway's list (once per TTL) when the static one cannot answer: a model it
        does not name or records as shut down, or no model (the default follows what is served)."""
        if model is None:
            manifest = load_manifest(ep.provider)
            if manifest.default_preference or not manifest.default_model:
                await self._discover_once(ep)
        elif model not in self._served_ids(ep) or self.belief(ep, model).shut_down():
            cached = self._discovered.get(ep.name)
            if cached is not None and time.monotonic() - cached.at > RELIST_AFTER_S:
                # A model released since the list was read: read it again (once a minute at most).
                try:
                    await self.refresh(ep, force=True)
                except ImageGenError as exc:
                    log.warning("discovery on %s failed: %s", ep.name, exc.message)
            await self._discover_once(ep)

    async def listed_price(self, ep: EndpointConfig, model: str) -> float | None:
        """The per-image price the gateway's discovery lists for a model, if it lists one (spending
        limits want it; the discovered list is cached for discovery_ttl_s)."""
        if load_manifest(ep.provider).discovery is None:
            return None
        try:
            await self.refresh(ep)
        except ImageGenError as exc:
            log.warning("discovery on %s failed: %s", ep.name, exc.message)
        return self.belief(ep, model).spec.usd_per_image

    def _find(self, ep: EndpointConfig, model: str) -> Belief | None:
        """The model on this endpoint, if the endpoint may serve it (shut-down ones included)."""
        if ep.models is not None:
            return self.belief(ep, model) if model in ep.models else None
        if model in self._served_ids(ep):
            return self.belief(ep, model)
        manifest = load_manifest(ep.provider)
        if (entry := manifest.model(model)) is not None and entry.shutdown_date:
            return self.belief(ep, model)  # recorded as shut down: routing explains what instead
        if manifest.unknown_models is not None:
            return self.belief(ep, model)  # a gateway whose models nobody can list: send it
        if ep.name in self._discovered or manifest.transport != "http":
            return None  # the gateway's own list (or the built-in one) does not have it
        # No list to ask: a model of a known family may well be served; the gateway judges.
        return self.belief(ep, model) if family_for(model) is not None else None

    def default_model(self, ep: EndpointConfig, need: set[Capability]) -> Belief | None:
        """The endpoint's default for what is needed: from what it serves now, by preference."""
        served = [b for b in self.beliefs(ep) if _can(b, need)]
        if ep.models:
            return served[0] if served else None
        manifest = load_manifest(ep.provider)
        if ep.name in self._discovered:
            # By pattern, the first served match; a model with a shutdown date ahead only when
            # no pattern matches one without.
            ordered = sorted(served, key=_natural)
            ranked = [b for p in manifest.default_preference for b in ordered if re.search(p, b.id, re.I)]
            lasting = [b for b in ranked if not b.deprecation()]
            if lasting or ranked:
                return (lasting or ranked)[0]
        if manifest.default_model:
            chosen = next((b for b in served if b.id == manifest.default_model), None)
            if chosen is None and ep.name not in self._discovered:
                candidate = self.belief(ep, manifest.default_model)
                chosen = candidate if _can(candidate, need) and not candidate.shut_down() else None
            if chosen is not None:
                return chosen
        return served[0] if served else None

    def mark_gone(self, endpoint: EndpointConfig, model_id: str) -> None:
        """The gateway answered that the model does not exist (or no longer does)."""
        self._gone_at[(endpoint.name, model_id)] = time.monotonic()

    def _gone(self, endpoint: EndpointConfig, belief: Belief) -> bool:
        """Whether the model is known not to be served here any more.

        The gateway's word decides: its discovery (no such id, or a past shutdown date) or its
        answer to an earlier call. A shutdown the manifest records is only a reason to ask the
        gateway; where it cannot be asked, the request is sent and the gateway judges."""
        if self._said_gone(endpoint, belief.id):
            return True
        if not belief.shut_down():
            return False
        found = self._discovered.get(endpoint.name)
        return found is not None and endpoint.models is None

    def _said_gone(self, endpoint: EndpointConfig, model_id: str) -> bool:
        said = self._gone_at.get((endpoint.name, model_id))
        return said is not None and time.monotonic() - said < self._settings.discovery_ttl_s

    def _shut_down_message(self, model: str, gone: list[tuple[EndpointConfig, Belief]], need: set[Capability]) -> str:
        ep, belief = gone[0]
        if not belief.shut_down():
            instead = self.replacement_for(ep, need, model)
            use = f"; use model {instead!r} instead" if instead else ""
            return (
                f"model {model!r} is not available on endpoint {ep.name!r}: the gateway answered that it does "
                f"not exist or was shut down{use}"
            )
        instead = None
        replacement = belief.spec.replacement
        if replacement:
            candidate = self._find(ep, replacement)
            if candidate is not None and not candidate.shut_down() and _can(candidate, need):
                instead = candidate.id
        if instead is None:
            default = self.default_model(ep, need)
            instead = default.id if default is not None else None
        when = f" on {belief.spec.shutdown_date}" if belief.spec.shutdown_date else ""
        use = f"; use model {instead!r} on endpoint {ep.name!r} instead" if instead else ""
        return f"model {model!r} was shut down by its provider{when} and is no longer served{use}"

    def _served_summary(self, endpoints: list[EndpointConfig]) -> str:
        parts = []
        for ep in endpoints:
            ids = [b.id for b in self.beliefs(ep)]
            parts.append(f"{ep.name}: {', '.join(ids) if ids else '(any model the gateway has)'}")
        return "; ".join(parts) + ". Call list_models for details."

    def _capability_message(self, model: str | None, need: set[Capability], endpoints: list[EndpointConfig]) -> str:
        wanted = " + ".join(sorted(need))
        able = [f"{b.id} on {ep.name}" for ep in endpoints for b in self.beliefs(ep) if _can(b, need)]
        subject = f"model {model!r}" if model else "no configured model"
        tail = f" Models that can: {', '.join(able)}." if able else " No configured model can."
        verb = "cannot do" if model else "can do"
        return f"{subject} {verb} {wanted}.{tail}"

    def successor(self, ep: EndpointConfig, belief: Belief) -> str | None:
        """For a deprecated model: the endpoint's default for what it can do, if that lasts longer."""
        if belief.deprecation() is None:
            return None
        default = self.default_model(ep, set(belief.spec.capabilities or ()) & {"generate", "edit"} or {"generate"})
        return default.id if default is not None and default.id != belief.id and not default.deprecation() else None

    def replacement_for(self, ep: EndpointConfig, need: set[Capability], not_this: str) -> str | None:
        """A model that works on this endpoint, for an error about one that does not."""
        for belief in [self.default_model(ep, need), *self.beliefs(ep)]:
            if belief is not None and belief.id != not_this and _can(belief, need):
                return belief.id
        return None
