"""Size limits that more than one stage must agree on, kept free of heavy imports.

Claude Desktop refuses tool results over 1 MiB; Claude Code counts image blocks against
MAX_MCP_OUTPUT_TOKENS (25,000 by default), estimated from their base64 length. So a whole result
stays under RESULT_CAP_BYTES, and the previews of one result share PREVIEWS_TOTAL_BYTES.
"""

from __future__ import annotations

RESULT_CAP_BYTES = 900_000  # the whole serialized tool result, with room under 1 MiB
PREVIEW_MAX_BYTES = 200_000  # one preview never needs more
PREVIEWS_TOTAL_BYTES = 64_000  # all previews of one result; an explicit inline_full is not held to it
MIN_PREVIEW_BYTES = 10_000  # below this a preview is not worth showing: leave it out instead


def preview_bytes_for(n: int) -> int:
    """The bytes one preview may take when `n` previews share a result."""
    return min(PREVIEW_MAX_BYTES, max(MIN_PREVIEW_BYTES, PREVIEWS_TOTAL_BYTES // max(1, n)))
