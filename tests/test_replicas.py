"""Three replicas behind Debian's nginx, sharing an S3 bucket (moto) and Redis, as a team runs them.

Each replica is a real `mcp-imagegen serve --transport http --stateless` process. They listen on
127.0.0.2, .3 and .4 at one port, so nginx can send every one the same Host header (the server's
DNS-rebinding guard accepts only local names on its own port when bound to loopback). nginx adds
`X-Upstream` to each answer, so the test knows which replica answered what.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import httpx2
import pytest
from mcp.client import Client
from mcp.client.streamable_http import streamable_http_client

from tests.conftest import SECRET_KEY
from tests.services import S3Server, missing, redis_server, s3_server

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

REPLICA_HOSTS = ["127.0.0.2", "127.0.0.3", "127.0.0.4"]
KEY_ENV = "TEAM_TEST_GATEWAY_KEY"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def nginx_binary() -> str:
    found = shutil.which("nginx") or ("/usr/sbin/nginx" if os.access("/usr/sbin/nginx", os.X_OK) else None)
    if found is None:
        missing("nginx", "apt-get install nginx")
    return str(found)


def port_free_on_all(hosts: list[str]) -> int:
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind((hosts[0], 0))
            port = probe.getsockname()[1]
        try:
            for host in hosts:
                with socket.socket() as s:
                    s.bind((host, port))
        except OSError:
            continue
        return int(port)
    raise AssertionError("no port free on every replica address")


def wait_until(condition: Any, what: str, timeout_s: float = 60.0) -> Any:
    import time

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def answers(url: str) -> bool:
    try:
        return httpx2.get(url, timeout=2).status_code == 200
    except httpx2.HTTPError:
        return False


@dataclass
class Team:
    origin: str  # nginx
    port: int  # every replica's port
    replicas: dict[str, subprocess.Popen[bytes]]
    redis_url: str
    logs: Path
    served_by: list[tuple[str, str]] = field(default_factory=list)  # (tool or method, upstream)

    def client(self) -> Client:
        async def note(response: httpx2.Response) -> None:
            body = response.request.content or b""
            name = json.loads(body).get("params", {}).get("name") if body.startswith(b"{") else None
            self.served_by.append((str(name), response.headers.get("x-upstream", "")))

        http = httpx2.AsyncClient(timeout=httpx2.Timeout(30, read=120), event_hooks={"response": [note]})
        return Client(streamable_http_client(f"{self.origin}/mcp", http_client=http), mode="legacy")

    def last_upstream(self, tool: str) -> str:
        return [upstream for name, upstream in self.served_by if name == tool][-1]

    def replica_of_job(self, job_id: str) -> str:
        """The replica address running a job, from its record in Redis (the pid that runs it)."""
        import redis

        record = json.loads(redis.Redis.from_url(self.redis_url).get(f"mcp-imagegen:job:{job_id}"))
        [host] = [h for h, p in self.replicas.items() if p.pid == record["pid"]]
        return f"{host}:{self.port}"


@contextmanager
def team(tmp_path: Path, gateway_url: str, s3: S3Server) -> Iterator[Team]:
    nginx = nginx_binary()
    config = tmp_path / "mcp-imagegen.toml"
    config.write_text(
        f"""output_dir = "{tmp_path / "unused-out"}"
tool_deadline_s = 1.0

[[endpoints]]
name = "openai"
provider = "openai"
base_url = "{gateway_url}"
api_key_env = "{KEY_ENV}"

[storage]
s3_bucket = "{s3.bucket}"
s3_endpoint_url = "{s3.endpoint_url}"
s3_region = "us-east-1"
""",
        encoding="utf-8",
    )
    with redis_server() as redis:
        redis_url = redis.url
        env = {
            **os.environ,
            "MCP_IMAGEGEN_CONFIG": str(config),
            KEY_ENV: SECRET_KEY,
            "MCP_IMAGEGEN_REDIS_URL": redis_url,
            "MCP_IMAGEGEN_JOB_LEASE_S": "2",  # a dead replica's jobs read as interrupted within seconds
        }
        env.pop("MCP_IMAGEGEN_OUTPUT_DIR", None)
        logs = tmp_path / "logs"
        logs.mkdir()
        started: list[subprocess.Popen[bytes]] = []
        try:
            port, replicas = start_replicas(env, logs, started)
            origin = start_nginx(nginx, tmp_path / "nginx", port, logs, started)
            yield Team(origin, port, replicas, redis_url, logs)
        finally:
            stop_all(started)


def stop_all(processes: list[subprocess.Popen[bytes]]) -> None:
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    for process in processes:
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def start_replicas(
    env: dict[str, str], logs: Path, started: list[subprocess.Popen[bytes]]
) -> tuple[int, dict[str, subprocess.Popen[bytes]]]:
    """Three replicas on one port of 127.0.0.2-4; another port if something takes the chosen one first."""
    for _attempt in range(5):
        port = port_free_on_all(REPLICA_HOSTS)
        replicas: dict[str, subprocess.Popen[bytes]] = {}
        for host in REPLICA_HOSTS:
            command = [sys.executable, "-m", "mcp_imagegen", "serve", "--transport", "http"]
            replicas[host] = subprocess.Popen(
                [*command, "--host", host, "--port", str(port), "--stateless"],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=open(logs / f"{host}.log", "ab"),  # noqa: SIM115 - closed with the process
            )
            started.append(replicas[host])
        for host, process in replicas.items():
            wait_until(
                lambda h=host, p=process, at=port: answers(f"http://{h}:{at}/readyz") or p.poll() is not None,
                f"replica {host}",
            )
        if all(process.poll() is None for process in replicas.values()):
            return port, replicas
        stop_all(list(replicas.values()))
    raise AssertionError("the replicas did not start: " + (logs / f"{REPLICA_HOSTS[0]}.log").read_text()[-2000:])


def start_nginx(nginx: str, root: Path, port: int, logs: Path, started: list[subprocess.Popen[bytes]]) -> str:
    """nginx on a free loopback port in front of the replicas; yields its origin."""
    root.mkdir()
    upstreams = "\n".join(f"        server {h}:{port} max_fails=1 fail_timeout=60s;" for h in REPLICA_HOSTS)
    for _attempt in range(5):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            lb_port = probe.getsockname()[1]
        conf = root / "nginx.conf"
        conf.write_text(
            NGINX_TEST_CONF.format(root=root, upstreams=upstreams, lb_port=lb_port, port=port), encoding="utf-8"
        )
        process = subprocess.Popen(
            [nginx, "-c", str(conf), "-p", str(root)],
            stdout=subprocess.DEVNULL,
            stderr=open(logs / "nginx.log", "ab"),  # noqa: SIM115
        )
        started.append(process)
        origin = f"http://127.0.0.1:{lb_port}"
        wait_until(lambda o=origin, p=process: answers(f"{o}/healthz") or p.poll() is not None, "nginx")
        if process.poll() is None:
            return origin
    raise AssertionError("nginx did not start: " + (logs / "nginx.log").read_text())


# The proxy settings are deploy/nginx.conf's; only the addresses, the Host header and the paths differ.
NGINX_TEST_CONF = """
daemon off;
worker_processes 1;
pid {root}/nginx.pid;
error_log {root}/error.log warn;
events {{ worker_connections 256; }}
http {{
    access_log off;
    client_body_temp_path {root}/body;
    proxy_temp_path {root}/proxy;
    fastcgi_temp_path {root}/fastcgi;
    uwsgi_temp_path {root}/uwsgi;
    scgi_temp_path {root}/scgi;

    upstream replicas {{
{upstreams}
    }}
    server {{
        listen 127.0.0.1:{lb_port};
        client_max_body_size 64m;
        location / {{
            proxy_pass http://replicas;
            proxy_http_version 1.1;
            proxy_set_header Host localhost:{port};
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_read_timeout 300s;
            proxy_next_upstream error timeout;
            add_header X-Upstream $upstream_addr always;
        }}
    }}
}}
"""


def status_of(result: Any) -> str:
    return (result.structured_content or {}).get("status", "error" if result.is_error else "")


def texts(result: Any) -> str:
    return "\n".join(getattr(b, "text", "") for b in result.content)


async def finished(client: Client, result: Any) -> Any:
    """A generation's result once done, collected with get_image if the call outlived its deadline."""
    while status_of(result) == "running":
        result = await client.call_tool("get_image", {"job_id": result.structured_content["job_id"], "wait_s": 5})
    assert status_of(result) == "done", texts(result)
    return result


async def test_a_job_started_through_one_replica_is_collected_through_another(
    tmp_path: Path, emulator: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    emu = emulator("openai", api_key=SECRET_KEY)
    with s3_server(monkeypatch) as s3, team(tmp_path, emu.base_url, s3) as t:
        for host in REPLICA_HOSTS:
            assert httpx2.get(f"http://{host}:{t.port}/healthz", timeout=10).status_code == 200
        emu.hold()
        with anyio.fail_after(120):
            async with t.client() as client:
                started = await client.call_tool("generate_image", {"prompt": "slow fox", "model": "gpt-image-2"})
                assert status_of(started) == "running", texts(started)
                job_id = started.structured_content["job_id"]
                starter = t.last_upstream("generate_image")
                assert starter == t.replica_of_job(job_id)
                emu.release()
                while True:  # until another replica than the starter hands over the finished job
                    got = await client.call_tool("get_image", {"job_id": job_id, "wait_s": 0})
                    assert not got.is_error, texts(got)
                    if status_of(got) == "done" and t.last_upstream("get_image") != starter:
                        break
                    await anyio.sleep(0.05)
                [image] = got.structured_content["images"]
                read = await client.read_resource(image["uri"])
                assert read.contents[0].mime_type == image["mime_type"]


async def test_a_replica_killed_mid_job_loses_nothing_the_others_held(
    tmp_path: Path, emulator: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    emu = emulator("openai", api_key=SECRET_KEY)
    with s3_server(monkeypatch) as s3, team(tmp_path, emu.base_url, s3) as t:
        with anyio.fail_after(180):
            async with t.client() as client:
                # Images made before, on whichever replicas nginx chose.
                before = []
                for i in range(3):
                    made = await client.call_tool("generate_image", {"prompt": f"kept {i}", "model": "gpt-image-2"})
                    made = await finished(client, made)
                    before += [img["uri"] for img in made.structured_content["images"]]

                # Two jobs in flight on two different replicas.
                emu.hold()
                jobs: dict[str, str] = {}  # replica -> job id
                while len(jobs) < 2:
                    started = await client.call_tool("generate_image", {"prompt": "held", "model": "gpt-image-2"})
                    assert status_of(started) == "running", texts(started)
                    job_id = started.structured_content["job_id"]
                    jobs.setdefault(t.replica_of_job(job_id), job_id)
                (doomed_at, doomed), (kept_at, kept) = list(jobs.items())[:2]
                victim = t.replicas[doomed_at.split(":")[0]]
                victim.send_signal(signal.SIGKILL)
                victim.wait(timeout=30)
                emu.release()

                # The survivor's job finishes and is collected through the balancer.
                got = await client.call_tool("get_image", {"job_id": kept, "wait_s": 0})
                got = await finished(client, got)
                kept_images = [img["uri"] for img in got.structured_content["images"]]
                assert kept_images

                # The dead replica's job reads as interrupted (its lease lapsed), on every replica.
                while True:
                    lost = await client.call_tool("get_image", {"job_id": doomed, "wait_s": 0})
                    if lost.is_error:
                        assert "interrupted" in texts(lost)
                        break
                    assert status_of(lost) == "running"
                    await anyio.sleep(0.1)

                # Everything saved before, wherever it was made, is still there.
                listed = {str(r.uri) for r in (await client.list_resources()).resources}
                assert set(before) | set(kept_images) <= listed
                for uri in before:
                    assert (await client.read_resource(uri)).contents
        assert httpx2.get(f"http://{kept_at}/readyz", timeout=10).status_code == 200


def test_the_container_and_balancer_examples_use_what_the_server_offers() -> None:
    """The Dockerfile's command parses, and the example nginx config proxies as the test's does."""
    from mcp_imagegen.cli import _parser

    root = Path(__file__).resolve().parent.parent
    dockerfile = (root / "Dockerfile").read_text(encoding="utf-8")
    [command] = [line for line in dockerfile.splitlines() if line.startswith("CMD ")]
    words = command.split("exec ", 1)[1].split('"]')[0].replace('\\"$PORT\\"', "8000").split()
    args = _parser().parse_args(words[1:])
    assert (args.transport, args.host, args.port, args.stateless) == ("http", "0.0.0.0", 8000, True)
    example = (root / "deploy" / "nginx.conf").read_text(encoding="utf-8")
    for directive in (
        "proxy_buffering off;",
        "proxy_next_upstream error timeout;",
        "client_max_body_size 64m;",
        'proxy_set_header Connection "";',
    ):
        assert directive in example and directive in NGINX_TEST_CONF.replace("{{", "{").replace("}}", "}")
