"""`python -m mcp_imagegen ARGS` at its default settings, with one diagnostic turned on.

The server's event-loop watchdog runs while its logger, `mcp_imagegen.loop`, is at DEBUG. Setting
`MCP_IMAGEGEN_LOG_LEVEL=DEBUG` would turn it on, but also every other DEBUG and INFO line and
uvicorn's access log, which cost the server time a user's server does not spend. Here only the
watchdog's logger is at DEBUG; the log level a user gets (WARNING) holds for everything else.

    python -m bench.watched_server serve --transport http --port P
"""

from __future__ import annotations

import logging
import sys

from mcp_imagegen.cli import main

if __name__ == "__main__":
    logging.getLogger("mcp_imagegen.loop").setLevel(logging.DEBUG)
    sys.exit(main())
