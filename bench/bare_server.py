"""The floor the MCP SDK sets: a bare `MCPServer` with one trivial tool, served over stdio.

Cold start of `mcp-imagegen` is compared against this process (same interpreter, same SDK), so
the ratio shows what the product adds on top of the SDK's own import and handshake cost.
Self-contained on purpose: run it as `python bench/bare_server.py`.
"""

from __future__ import annotations

from mcp.server.mcpserver import MCPServer

server: MCPServer = MCPServer("bench-bare")


@server.tool()
def echo(text: str) -> str:
    """Return the text unchanged."""
    return text


if __name__ == "__main__":
    server.run()
