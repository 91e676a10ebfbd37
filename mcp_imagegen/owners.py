"""Whose images and jobs these are: the person signed in (issuer + subject), or the local owner.

With `[oauth]`, every image record and job record carries its owner, and a person is shown only
their own: anyone else's id answers exactly as an id that does not exist, so ids cannot be probed.
Over stdio or with the static token, one server is one trust domain: everything belongs to
`LOCAL_OWNER`, as do records written before owners existed.

The owner comes from the verified access token the transport put in context (oauth.py); work
that runs outside the request (a job's own task) carries its owner and acts as it (`acting_as`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from mcp.server.auth.middleware.auth_context import get_access_token
from mcp.server.auth.provider import AccessToken

LOCAL_OWNER = "local"

_acting: ContextVar[str | None] = ContextVar("mcp_imagegen_owner", default=None)


def owner_of(token: AccessToken) -> str:
    """An opaque, stable id for the person behind a token: issuer and subject together, since a
    subject is unique only within its issuer. Hashed, so records do not carry people's names."""
    issuer = str((token.claims or {}).get("iss", ""))
    subject = token.subject or token.client_id
    digest = hashlib.sha256(f"{issuer}\n{subject}".encode()).hexdigest()[:32]
    return f"person-{digest}"


def current_owner() -> str:
    acting = _acting.get()
    if acting is not None:
        return acting
    token = get_access_token()
    return owner_of(token) if token is not None else LOCAL_OWNER


def signed_in() -> bool:
    """Whether the caller is a person signed in over the network (not the server's own user)."""
    return current_owner() != LOCAL_OWNER


@contextmanager
def acting_as(owner: str) -> Iterator[None]:
    reset = _acting.set(owner)
    try:
        yield
    finally:
        _acting.reset(reset)
