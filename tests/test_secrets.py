"""A known key, failing calls of every kind, and a search of every output for the key.

The server runs as a real stdio subprocess at DEBUG log level. Its stdout (the protocol: tool
results, resource listings), its stderr (logs, tracebacks) and the files it writes are all
searched, for the key and for its distinctive tail.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp.client import Client
from mcp.client.stdio import StdioServerParameters, stdio_client

from tests.conftest import SECRET_KEY
from tests.emulators import Fault

REPO = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.anyio, pytest.mark.slow]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def test_key_never_leaves_the_server(tmp_path: Path, emulator: Any) -> None:
    openai = emulator("openai", api_key="sk-the-gateways-real-key-000")  # our key is wrong here
    nano = emulator("nano-gpt", api_key=SECRET_KEY)
    relay = emulator("modelmax", api_key=SECRET_KEY)
    config = tmp_path / "config.toml"
    config.write_text(
        f'output_dir = "{(tmp_path / "out").as_posix()}"\nmax_retries = 1\n'
        f'[[endpoints]]\nname = "wrong-key"\nprovider = "openai"\nbase_url = "{openai.base_url}"\napi_key_env = "KEY"\n'
        f'[[endpoints]]\nname = "nano"\nprovider = "nano-gpt"\nbase_url = "{nano.base_url}"\napi_key_env = "KEY"\n'
        f'[[endpoints]]\nname = "relay"\nprovider = "modelmax"\nbase_url = "{relay.base_url}"\napi_key_env = "KEY"\n',
        encoding="utf-8",
    )
    env = {
        "MCP_IMAGEGEN_CONFIG": str(config),
        "KEY": SECRET_KEY,
        "MCP_IMAGEGEN_LOG_LEVEL": "DEBUG",
        "HOME": str(tmp_path / "home"),
        "PYTHONPATH": str(REPO),
    }
    # Gateways that echo the key back in their error messages, as some relays do.
    nano.inject(Fault.http(402, body={"error": f"Insufficient balance for key {SECRET_KEY}", "status": 402}))
    relay.inject(Fault.http(502, message=f"upstream refused Authorization: Bearer {SECRET_KEY}"), times=None)

    seen: list[str] = []
    stderr_log = tmp_path / "server-stderr.log"
    params = StdioServerParameters(command=sys.executable, args=["-m", "mcp_imagegen"], env=env, cwd=tmp_path)
    with anyio.fail_after(90), stderr_log.open("w") as errlog:
        async with Client(stdio_client(params, errlog=errlog)) as client:
            calls: list[tuple[str, dict[str, Any]]] = [
                ("generate_image", {"prompt": "x", "endpoint": "wrong-key", "model": "gpt-image-1"}),
                ("generate_image", {"prompt": "x", "endpoint": "nano", "model": "hidream"}),
                ("generate_image", {"prompt": "x", "endpoint": "relay"}),
                ("generate_image", {"prompt": "x", "endpoint": "nano", "model": "hidream", "size": "5x5"}),
                ("edit_image", {"prompt": "x", "images": ["/etc/passwd"], "endpoint": "nano"}),
                ("list_models", {"refresh": True}),
                ("get_image", {"job_id": "job_nope"}),
            ]
            errors = 0
            for name, arguments in calls:
                result = await client.call_tool(name, arguments)
                errors += bool(result.is_error)
                seen.append(result.model_dump_json())
            assert errors >= 5  # the failures really happened
            good = await client.call_tool("generate_image", {"prompt": "ok", "endpoint": "nano", "model": "hidream"})
            assert not good.is_error
            seen.append(good.model_dump_json())
            seen.append((await client.list_resources()).model_dump_json())
            seen.append((await client.list_resource_templates()).model_dump_json())
            listing = await client.read_resource("imagegen://images")
            seen.append(listing.model_dump_json())

    logs = stderr_log.read_text(encoding="utf-8")
    assert "gateway call" in logs and "DEBUG" in logs  # the logs really were captured
    seen.append(logs)
    seen.extend(p.read_text(encoding="utf-8") for p in (tmp_path / "out").rglob("*.json"))
    everything = "\n".join(seen)
    # The gateways' own words reached the agent, with the key cut out of them.
    assert "Insufficient balance for key" in everything and "upstream refused" in everything
    assert SECRET_KEY not in everything
    assert SECRET_KEY[-16:] not in everything
