"""mcp-imagegen: an MCP server for image generation and editing through OpenAI-compatible gateways.

Kept empty of imports so that `python -m mcp_imagegen` and the console script start fast: each
command loads only what it uses.
"""

__version__ = "0.1.0"
