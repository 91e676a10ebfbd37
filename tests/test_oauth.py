"""The HTTP transports as an OAuth resource server, against a real authorization server.

oidc-provider (npm, tests/authserver) issues RS256 JWT access tokens by the client_credentials
grant with resource indicators; each client stands for a person (its `sub`). The MCP server runs
in uvicorn on a free loopback port; the SDK's streamable HTTP client carries the tokens.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx2
import pytest
from mcp.client import Client
from mcp.client.sse import sse_client
from mcp.client.streamable_http import streamable_http_client

from mcp_imagegen import oauth
from mcp_imagegen.config import OAuthSettings, StorageSettings
from mcp_imagegen.transports import http_app, sse_app
from tests.services import AuthServer, auth_server, s3_server
from tests.test_transports import INIT, JSON_HEADERS, bound_socket, serve, settings_for, texts

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

BOTH = "images:generate images:read"
CLIENTS = [
    {"client_id": "alice", "scope": BOTH},
    {"client_id": "bob", "scope": BOTH},
    {"client_id": "reader", "scope": "images:read"},
    {"client_id": "stranger", "scope": "other:thing"},
    {"client_id": "brief", "scope": BOTH, "ttl": 1},
]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def issuer() -> Iterator[AuthServer]:
    with auth_server(CLIENTS) as server:
        yield server


@contextmanager
def resource_server(tmp_path: Path, issuer: AuthServer, app_for: Any = http_app, path: str = "/mcp") -> Iterator[str]:
    """The MCP server with [oauth] naming `issuer`; yields its resource URL."""
    sock = bound_socket()
    resource = f"http://127.0.0.1:{sock.getsockname()[1]}{path}"
    settings = settings_for(tmp_path, oauth=OAuthSettings(issuer=issuer.issuer, resource=resource, clock_skew_s=0))
    app = app_for(settings, host="127.0.0.1", port=sock.getsockname()[1])
    with serve(app, sock):
        yield resource


def mcp_client(resource: str, token: str) -> Client:
    http = httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}"}, timeout=httpx2.Timeout(30, read=120))
    return Client(streamable_http_client(resource, http_client=http), mode="auto")


def call(name: str, arguments: dict[str, Any]) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": name, "arguments": arguments}}


def challenge(response: httpx2.Response) -> dict[str, str]:
    """The WWW-Authenticate parameters of a Bearer challenge."""
    scheme, _, params = response.headers["www-authenticate"].partition(" ")
    assert scheme == "Bearer"
    found: dict[str, str] = {}
    for part in params.split('", '):
        key, _, value = part.partition("=")
        found[key.strip()] = value.strip().strip('"')
    return found


async def test_protected_resource_metadata_names_the_issuer_and_scopes(tmp_path: Path, issuer: AuthServer) -> None:
    with resource_server(tmp_path, issuer) as resource:
        origin = resource.removesuffix("/mcp")
        async with httpx2.AsyncClient(timeout=30) as http:
            for path in ("/.well-known/oauth-protected-resource/mcp", "/.well-known/oauth-protected-resource"):
                response = await http.get(origin + path)
                assert response.status_code == 200, path
                metadata = response.json()
                assert metadata["resource"] == resource
                assert metadata["authorization_servers"] == [issuer.issuer]
                assert set(metadata["scopes_supported"]) == {"images:generate", "images:read"}
            for path in ("/.well-known/oauth-authorization-server", "/.well-known/openid-configuration"):
                assert (await http.get(origin + path)).status_code == 404, path


async def test_missing_bad_expired_and_foreign_tokens_get_401(tmp_path: Path, issuer: AuthServer) -> None:
    with resource_server(tmp_path, issuer) as resource:
        brief = issuer.token("brief", resource, BOTH)
        foreign = issuer.token("alice", "http://127.0.0.1:9/someone-elses-api", BOTH)
        async with httpx2.AsyncClient(timeout=30) as http:
            none = await http.post(resource, json=INIT, headers=JSON_HEADERS)
            assert none.status_code == 401
            params = challenge(none)
            assert params["resource_metadata"] == resource.replace("/mcp", "/.well-known/oauth-protected-resource/mcp")
            assert params["scope"] == BOTH
            assert "error" not in params  # no token at all is no invalid token (RFC 6750 §3.1)

            def with_token(token: str) -> dict[str, str]:
                return {**JSON_HEADERS, "Authorization": f"Bearer {token}"}

            garbage = await http.post(resource, json=INIT, headers=with_token("not-a-jwt"))
            assert garbage.status_code == 401 and challenge(garbage)["error"] == "invalid_token"

            wrong_audience = await http.post(resource, json=INIT, headers=with_token(foreign))
            assert wrong_audience.status_code == 401
            assert "not issued for this server" in challenge(wrong_audience)["error_description"]

            # The brief client's tokens live one second: wait until this one's `exp` has passed.
            exp = oauth._jwt().decode(brief, options={"verify_signature": False})["exp"]
            with anyio.fail_after(30):
                while time.time() <= exp + 1:
                    await anyio.sleep(0.2)
            expired = await http.post(resource, json=INIT, headers=with_token(brief))
            assert expired.status_code == 401
            assert "expired" in challenge(expired)["error_description"]
            assert challenge(expired)["resource_metadata"] == params["resource_metadata"]


async def test_wrong_scope_gets_403_naming_the_scope(tmp_path: Path, issuer: AuthServer) -> None:
    with resource_server(tmp_path, issuer) as resource:
        stranger = issuer.token("stranger", resource, "other:thing")
        reader = issuer.token("reader", resource, "images:read")
        async with httpx2.AsyncClient(timeout=30) as http:
            refused = await http.post(
                resource, json=INIT, headers={**JSON_HEADERS, "Authorization": f"Bearer {stranger}"}
            )
            assert refused.status_code == 403
            assert challenge(refused)["error"] == "insufficient_scope"
            assert challenge(refused)["scope"] == BOTH

            reading = {**JSON_HEADERS, "Authorization": f"Bearer {reader}"}
            generate = await http.post(resource, json=call("generate_image", {"prompt": "x"}), headers=reading)
            assert generate.status_code == 403
            assert challenge(generate)["error"] == "insufficient_scope"
            assert challenge(generate)["scope"] == "images:generate"
            edit = await http.post(resource, json=[call("edit_image", {"prompt": "x", "images": "y"})], headers=reading)
            assert edit.status_code == 403 and challenge(edit)["scope"] == "images:generate"

        # What the read scope allows works through the SDK's client.
        with anyio.fail_after(60):
            async with mcp_client(resource, reader) as client:
                models = await client.call_tool("list_models", {})
                assert not models.is_error, texts(models)
                listed = await client.list_resources()
                assert not [r for r in listed.resources if str(r.uri).startswith("imagegen://images/")]


async def test_a_valid_token_works_through_the_sdk_client(tmp_path: Path, issuer: AuthServer) -> None:
    with resource_server(tmp_path, issuer) as resource:
        token = issuer.token("alice", resource, BOTH)
        with anyio.fail_after(60):
            async with mcp_client(resource, token) as client:
                result = await client.call_tool("generate_image", {"prompt": "signed in", "size": "32x32"})
                assert not result.is_error, texts(result)
                [image] = result.structured_content["images"]
                read = await client.read_resource(image["uri"])
                assert read.contents[0].mime_type == image["mime_type"]


async def test_legacy_sse_takes_the_same_tokens(tmp_path: Path, issuer: AuthServer) -> None:
    with resource_server(tmp_path, issuer, app_for=sse_app, path="/sse") as resource:
        token = issuer.token("alice", resource, BOTH)
        async with httpx2.AsyncClient(timeout=30) as http:
            refused = await http.get(resource)
            assert refused.status_code == 401 and "resource_metadata" in challenge(refused)
        with anyio.fail_after(60):
            transport = sse_client(resource, headers={"Authorization": f"Bearer {token}"})
            async with Client(transport, mode="legacy") as client:
                result = await client.call_tool("generate_image", {"prompt": "over sse", "size": "32x32"})
                assert not result.is_error, texts(result)


async def test_rotated_signing_keys_are_fetched_again(
    tmp_path: Path, issuer: AuthServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A restarted issuer signs with a new key: the server fetches the keys again for its `kid`."""
    monkeypatch.setattr(oauth, "JWKS_REFETCH_EVERY_S", 0.0)
    with bound_socket() as sock:  # a free port for an issuer that restarts on it
        port = sock.getsockname()[1]
    with auth_server(CLIENTS, port=port) as first:
        with resource_server(tmp_path, first) as resource:
            old = first.token("alice", resource, BOTH)
            async with httpx2.AsyncClient(timeout=30) as http:
                headers = {**JSON_HEADERS, "Authorization": f"Bearer {old}"}
                assert (await http.post(resource, json=INIT, headers=headers)).status_code == 200
                first.process.terminate()
                first.process.wait(timeout=30)
                with auth_server(CLIENTS, port=port) as second:
                    assert second.issuer == first.issuer
                    new = second.token("alice", resource, BOTH)
                    headers = {**JSON_HEADERS, "Authorization": f"Bearer {new}"}
                    assert (await http.post(resource, json=INIT, headers=headers)).status_code == 200
                    # The old key is gone from the issuer, so its tokens are no longer taken.
                    headers = {**JSON_HEADERS, "Authorization": f"Bearer {old}"}
                    stale = await http.post(resource, json=INIT, headers=headers)
                    assert stale.status_code == 401
                    assert "key the issuer does not publish" in challenge(stale)["error_description"]


# --- each person's images are their own ---------------------------------------------------------


async def _refused(client: Client, tool: str, arguments: dict[str, Any]) -> str:
    result = await client.call_tool(tool, arguments)
    assert result.is_error, f"{tool} {arguments} answered another person's data: {texts(result)}"
    return texts(result)


async def _image_uris(client: Client) -> set[str]:
    listed = await client.list_resources()
    return {str(r.uri) for r in listed.resources if str(r.uri).startswith("imagegen://images/")}


@pytest.mark.parametrize(("stateless", "storage"), [(False, "folder"), (True, "folder"), (True, "bucket")])
async def test_people_cannot_reach_each_others_images_by_any_route(
    tmp_path: Path,
    issuer: AuthServer,
    stateless: bool,
    storage: str,
    monkeypatch: pytest.MonkeyPatch,
    request: pytest.FixtureRequest,
) -> None:
    with bound_socket() as sock:
        port = sock.getsockname()[1]
    resource = f"http://127.0.0.1:{port}/mcp"
    stack = ExitStack()
    request.addfinalizer(stack.close)
    bucket = {}
    if storage == "bucket":  # images and job records in an S3 bucket (moto's server)
        s3 = stack.enter_context(s3_server(monkeypatch))
        bucket = {"s3_bucket": s3.bucket, "s3_endpoint_url": s3.endpoint_url, "s3_region": "us-east-1"}

    def job_of(image: dict[str, Any]) -> str:
        if storage == "bucket":
            key = f"mcp-imagegen/records/{image['id']}.json"
            raw = s3.client().get_object(Bucket=s3.bucket, Key=key)["Body"].read()
        else:
            raw = (tmp_path / "out" / ".mcp-imagegen" / f"{image['id']}.json").read_bytes()
        return str(json.loads(raw)["job_id"])

    settings = settings_for(
        tmp_path,
        oauth=OAuthSettings(issuer=issuer.issuer, resource=resource, clock_skew_s=0),
        storage=StorageSettings(**bucket),
    )
    alice_token, bob_token = issuer.token("alice", resource, BOTH), issuer.token("bob", resource, BOTH)
    sock = bound_socket_at(port)
    app = http_app(settings, host="127.0.0.1", port=port, stateless=stateless)
    with serve(app, sock), anyio.fail_after(120):
        async with mcp_client(resource, alice_token) as alice:
            made = await alice.call_tool("generate_image", {"prompt": "alice's fox", "size": "32x32"})
            assert not made.is_error, texts(made)
            [image] = made.structured_content["images"]
            job_id = job_of(image)
            assert job_id
            edited = await alice.call_tool("edit_image", {"prompt": "bluer", "images": image["uri"]})
            assert not edited.is_error, texts(edited)
            [child] = edited.structured_content["images"]
            # Alice reaches her own images by every route (the control for what Bob is refused).
            assert {image["uri"], child["uri"]} <= await _image_uris(alice)
            assert (await alice.read_resource(image["uri"])).contents
            assert not (await alice.call_tool("get_image", {"image": image["uri"]})).is_error
            assert not (await alice.call_tool("get_image", {"job_id": job_id})).is_error

        async with mcp_client(resource, bob_token) as bob:
            assert await _image_uris(bob) == set()
            recent = await bob.read_resource("imagegen://images")
            assert image["id"] not in recent.contents[0].text and child["id"] not in recent.contents[0].text
            for uri in (image["uri"], child["uri"]):
                with pytest.raises(Exception) as refused:
                    await bob.read_resource(uri)
                assert "forbidden" not in str(refused.value).lower()
                said = await _refused(bob, "get_image", {"image": uri})
                assert "no saved image" in said and "forbidden" not in said.lower()
                said = await _refused(bob, "edit_image", {"prompt": "mine now", "images": uri})
                assert "no saved image" in said
                said = await _refused(bob, "edit_image", {"prompt": "mine now", "images": image["uri"], "mask": uri})
                assert "no saved image" in said
            said = await _refused(bob, "edit_image", {"prompt": "by path", "images": image["path"]})
            if storage == "folder":
                assert "cannot name files on the server" in said
            said = await _refused(bob, "get_image", {"job_id": job_id})
            assert "no job" in said
            # Bob's own work stays his: he sees it, and Alice's listing does not.
            own = await bob.call_tool("generate_image", {"prompt": "bob's owl", "size": "32x32"})
            assert not own.is_error, texts(own)
            [bobs] = own.structured_content["images"]
            assert await _image_uris(bob) == {bobs["uri"]}

        async with mcp_client(resource, alice_token) as alice:
            assert bobs["uri"] not in await _image_uris(alice)

    # Another server on the same storage knows the job only by its record: still hers alone.
    with bound_socket() as other:
        other_port = other.getsockname()[1]
    second = http_app(settings, host="127.0.0.1", port=other_port, stateless=stateless)
    with serve(second, bound_socket_at(other_port)), anyio.fail_after(120):
        origin = f"http://127.0.0.1:{other_port}/mcp"
        async with mcp_client(origin, bob_token) as bob:
            said = await _refused(bob, "get_image", {"job_id": job_id})
            assert "no job" in said
        async with mcp_client(origin, alice_token) as alice:
            collected = await alice.call_tool("get_image", {"job_id": job_id})
            assert not collected.is_error, texts(collected)
            assert [i["uri"] for i in collected.structured_content["images"]] == [image["uri"]]


def bound_socket_at(port: int) -> Any:
    import socket

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    return sock
