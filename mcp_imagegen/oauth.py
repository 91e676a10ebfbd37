"""The HTTP transports as an OAuth 2.1 resource server (MCP authorization, 2026-07-28).

- Discovery: RFC 9728 protected resource metadata at `/.well-known/oauth-protected-resource`
  and its path-suffixed form (`.../oauth-protected-resource/mcp`), naming the issuer and scopes.
  Other `/.well-known/` documents are 404: this server is no authorization server.
- Tokens: JWT access tokens (RFC 9068) signed by the issuer, whose keys come from the `jwks_uri`
  in its metadata (RFC 8414, else OpenID discovery). Keys are cached; a token naming an unknown
  `kid` (the issuer rotated its keys) refetches them, at most once per `JWKS_REFETCH_EVERY_S`, so
  made-up kids cannot make this server hammer the issuer. `iss`, `aud` (this server's resource URI,
  RFC 8707), `exp` and `nbf` are checked.
- Answers: no or a bad token gets 401 with `WWW-Authenticate: Bearer resource_metadata="...",
  scope="..."`; a good token without the scope a request needs gets 403 `insufficient_scope`
  naming it (the client can step up). Which scope a request needs is read from its JSON-RPC body:
  generating and editing need the generate scope; reading images, listings and jobs the read scope.

The verified token is put where the SDK looks for it (`scope["user"]`, `get_access_token()`), so
the SDK binds sessions to the person, and owners.py finds who is calling.
"""

from __future__ import annotations

import json
import logging
import time
import urllib.parse
from collections.abc import Iterable
from typing import Any

import anyio
import httpx2
from mcp.server.auth.middleware.auth_context import auth_context_var
from mcp.server.auth.middleware.bearer_auth import AuthenticatedUser
from mcp.server.auth.provider import AccessToken
from starlette.authentication import AuthCredentials
from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .config import OAuthSettings
from .errors import ConfigError

log = logging.getLogger("mcp_imagegen.oauth")

JWKS_REFETCH_EVERY_S = 10.0
# Asymmetric algorithms only: with HS256 anyone holding the (public) key could mint tokens.
ALGORITHMS = ["RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"]
PRM_PATH = "/.well-known/oauth-protected-resource"
WELL_KNOWN_PREFIX = "/.well-known/"

# Methods by the scope they need; tools by theirs. Anything else (initialize, tools/list,
# list_models, ping) needs either scope.
_READ_METHODS = {"resources/read", "resources/list", "resources/templates/list", "resources/subscribe"}
_GENERATE_TOOLS = {"generate_image", "edit_image"}
_READ_TOOLS = {"get_image"}


def _jwt() -> Any:
    try:
        import jwt  # PyJWT
        from jwt.algorithms import has_crypto
    except ImportError:  # pragma: no cover - PyJWT comes with the SDK
        raise ConfigError("[oauth] needs PyJWT: pip install 'mcp-imagegen[team]'") from None
    if not has_crypto:
        raise ConfigError("[oauth] needs PyJWT's signature algorithms: pip install 'mcp-imagegen[team]'")
    return jwt


class TokenRejected(Exception):
    """Why a token is not accepted; the reason goes back in `error_description` (it holds no secret)."""


class JwksTokenVerifier:
    """The SDK's `TokenVerifier` for JWT access tokens signed with the issuer's published keys."""

    def __init__(self, oauth: OAuthSettings, http: httpx2.AsyncClient | None = None) -> None:
        self._jwt = _jwt()
        self.oauth = oauth
        self._http = http
        self._keys: dict[str, Any] = {}  # kid -> PyJWK
        self._jwks_uri: str | None = None
        self._fetched_at = -float("inf")
        self._lock = anyio.Lock()

    async def verify_token(self, token: str) -> AccessToken | None:
        """The SDK's protocol: the token's facts, or None when it is not good here."""
        try:
            return await self.verify(token)
        except TokenRejected:
            return None

    async def verify(self, token: str) -> AccessToken:
        jwt = self._jwt
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise TokenRejected("the token is not a JWT") from None
        alg = header.get("alg")
        if alg not in ALGORITHMS:
            raise TokenRejected(f"tokens signed with {alg!r} are not accepted")
        key = await self._key(str(header.get("kid", "")))
        try:
            claims = jwt.decode(
                token,
                key.key,
                algorithms=[alg],
                audience=self.oauth.resource,
                issuer=self.oauth.issuer,
                leeway=self.oauth.clock_skew_s,
                options={"require": ["exp", "iss", "aud", "sub"]},
            )
        except jwt.ExpiredSignatureError:
            raise TokenRejected("the token has expired; get a new one") from None
        except jwt.ImmatureSignatureError:
            raise TokenRejected("the token is not valid yet (nbf)") from None
        except jwt.InvalidAudienceError:
            raise TokenRejected(f"the token was not issued for this server ({self.oauth.resource})") from None
        except jwt.InvalidIssuerError:
            raise TokenRejected("the token comes from another issuer") from None
        except jwt.PyJWTError as exc:
            raise TokenRejected(f"the token is not valid: {exc}") from None
        return AccessToken(
            token=token,
            client_id=str(claims.get("client_id") or claims.get("azp") or claims["sub"]),
            scopes=token_scopes(claims),
            expires_at=int(claims["exp"]),
            resource=self.oauth.resource,
            subject=str(claims["sub"]),
            claims=claims,
        )

    async def _key(self, kid: str) -> Any:
        if kid not in self._keys:
            async with self._lock:
                # Another request may have refetched while this one waited for the lock.
                if kid not in self._keys and time.monotonic() - self._fetched_at >= JWKS_REFETCH_EVERY_S:
                    await self._fetch_keys()
        key = self._keys.get(kid)
        if key is None:
            raise TokenRejected("the token is signed with a key the issuer does not publish")
        return key

    async def _fetch_keys(self) -> None:
        self._fetched_at = time.monotonic()
        try:
            async with self._client() as http:
                if self._jwks_uri is None:
                    self._jwks_uri = await self._discover_jwks_uri(http)
                response = await http.get(self._jwks_uri)
                response.raise_for_status()
                jwks = self._jwt.PyJWKSet.from_dict(response.json())
        except (httpx2.HTTPError, ValueError, self._jwt.PyJWTError) as exc:
            log.warning("cannot fetch the issuer's signing keys (%s): %s", self.oauth.issuer, exc)
            raise TokenRejected("the issuer's signing keys cannot be fetched; try again shortly") from None
        self._keys = {k.key_id: k for k in jwks.keys if k.key_id and getattr(k, "public_key_use", "sig") != "enc"}
        log.info("fetched %d signing keys from %s", len(self._keys), self._jwks_uri)

    async def _discover_jwks_uri(self, http: httpx2.AsyncClient) -> str:
        for url in metadata_urls(self.oauth.issuer):
            response = await http.get(url)
            if response.status_code != 200:
                continue
            metadata = response.json()
            if metadata.get("issuer") != self.oauth.issuer:
                raise ValueError(f"the metadata at {url} names issuer {metadata.get('issuer')!r}")
            if metadata.get("jwks_uri"):
                return str(metadata["jwks_uri"])
        raise ValueError("the issuer publishes no metadata with a jwks_uri")

    def _client(self) -> Any:
        if self._http is not None:
            return _Borrowed(self._http)
        return httpx2.AsyncClient(timeout=httpx2.Timeout(10.0), follow_redirects=False)


class _Borrowed:
    """An injected client, used without closing it."""

    def __init__(self, http: httpx2.AsyncClient) -> None:
        self._http = http

    async def __aenter__(self) -> httpx2.AsyncClient:
        return self._http

    async def __aexit__(self, *exc: object) -> None:
        return None


def metadata_urls(issuer: str) -> list[str]:
    """Where an issuer's metadata lives: RFC 8414 (path inserted after the host), then OpenID."""
    parts = urllib.parse.urlsplit(issuer)
    path = parts.path.rstrip("/")
    origin = f"{parts.scheme}://{parts.netloc}"
    return [
        f"{origin}/.well-known/oauth-authorization-server{path}",
        f"{origin}{path}/.well-known/openid-configuration",
    ]


def token_scopes(claims: dict[str, Any]) -> list[str]:
    """`scope` (RFC 9068: space-separated) or `scp` (a list, as some identity providers send)."""
    scope = claims.get("scope")
    if isinstance(scope, str):
        return scope.split()
    scp = claims.get("scp")
    if isinstance(scp, list):
        return [str(s) for s in scp]
    if isinstance(scp, str):
        return scp.split()
    return []


def metadata_url(resource: str) -> str:
    """RFC 9728 §3.1: the well-known segment goes between the host and the resource's path."""
    parts = urllib.parse.urlsplit(resource)
    path = parts.path.rstrip("/")
    return f"{parts.scheme}://{parts.netloc}{PRM_PATH}{path}"


def protected_resource_metadata(oauth: OAuthSettings) -> dict[str, Any]:
    return {
        "resource": oauth.resource,
        "authorization_servers": [oauth.issuer],
        "scopes_supported": [oauth.scopes.generate, oauth.scopes.read],
        "bearer_methods_supported": ["header"],
        "resource_name": "mcp-imagegen",
    }


def needed_scopes(messages: Iterable[Any], oauth: OAuthSettings) -> set[str]:
    """The scopes the JSON-RPC requests in a body need (empty: any of this server's scopes will do)."""
    needed: set[str] = set()
    for message in messages:
        if not isinstance(message, dict):
            continue
        method = message.get("method")
        params = message.get("params") if isinstance(message.get("params"), dict) else {}
        if method in _READ_METHODS:
            needed.add(oauth.scopes.read)
        elif method == "tools/call":
            name = params.get("name")
            if name in _GENERATE_TOOLS:
                needed.add(oauth.scopes.generate)
            elif name in _READ_TOOLS:
                needed.add(oauth.scopes.read)
    return needed


class OAuthMiddleware:
    """Serves the resource metadata, and lets through only requests with a good token and scope."""

    def __init__(self, app: ASGIApp, oauth: OAuthSettings, max_body: int, verifier: JwksTokenVerifier | None = None):
        self.app = app
        self.oauth = oauth
        self.max_body = max_body
        self.verifier = verifier or JwksTokenVerifier(oauth)
        self._metadata_paths = {PRM_PATH, urllib.parse.urlsplit(metadata_url(oauth.resource)).path}
        self._all_scopes = f"{oauth.scopes.generate} {oauth.scopes.read}"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        if path.startswith(WELL_KNOWN_PREFIX):
            if path.rstrip("/") in self._metadata_paths and scope["method"] in ("GET", "HEAD"):
                response = JSONResponse(
                    protected_resource_metadata(self.oauth), headers={"Cache-Control": "max-age=300"}
                )
            else:
                response = JSONResponse({"error": "not_found"}, status_code=404)
            await response(scope, receive, send)
            return

        header = Headers(scope=scope).get("authorization", "")
        scheme, _, credentials = header.partition(" ")
        if scheme.lower() != "bearer" or not credentials.strip():
            await self._challenge(401, None, "send 'Authorization: Bearer <access token>'")(scope, receive, send)
            return
        try:
            token = await self.verifier.verify(credentials.strip())
        except TokenRejected as rejected:
            await self._challenge(401, "invalid_token", str(rejected))(scope, receive, send)
            return
        ours = {self.oauth.scopes.generate, self.oauth.scopes.read}
        if not ours & set(token.scopes):
            await self._insufficient(self._all_scopes)(scope, receive, send)
            return

        if scope["method"] == "POST":
            try:
                body = await _read_body(receive, self.max_body)
            except _TooLarge:
                message = f"the request body is larger than {self.max_body // (1024 * 1024)} MiB"
                await JSONResponse({"error": "too_large", "error_description": message}, 413)(scope, receive, send)
                return
            if body is None:
                return  # the client went away mid-body
            missing = needed_scopes(_messages(body), self.oauth) - set(token.scopes)
            if missing:
                await self._insufficient(" ".join(sorted(missing)))(scope, receive, send)
                return
            receive = _replay(body, receive)

        user = AuthenticatedUser(token)
        scope["user"] = user
        scope["auth"] = AuthCredentials(token.scopes)
        reset = auth_context_var.set(user)
        try:
            await self.app(scope, receive, send)
        finally:
            auth_context_var.reset(reset)

    def _challenge(self, status: int, error: str | None, description: str, scopes: str | None = None) -> JSONResponse:
        parts = [f'resource_metadata="{metadata_url(self.oauth.resource)}"', f'scope="{scopes or self._all_scopes}"']
        if error:
            parts = [f'error="{error}"', f'error_description="{_quoted(description)}"', *parts]
        return JSONResponse(
            {"error": error or "missing_token", "error_description": description},
            status_code=status,
            headers={"WWW-Authenticate": "Bearer " + ", ".join(parts)},
        )

    def _insufficient(self, scopes: str) -> JSONResponse:
        return self._challenge(403, "insufficient_scope", f"this request needs the scope {scopes}", scopes)


def _quoted(text: str) -> str:
    return text.replace("\\", "").replace('"', "'")


class _TooLarge(Exception):
    pass


async def _read_body(receive: Receive, limit: int) -> bytes | None:
    """The whole body (the scope it needs is inside), or None if the client disconnected."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return None
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise _TooLarge
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # then http.disconnect when the client goes

    return replay


def _messages(body: bytes) -> list[Any]:
    try:
        parsed = json.loads(body)
    except ValueError:
        return []  # the transport answers unreadable JSON with its own error
    return parsed if isinstance(parsed, list) else [parsed]
