import sys

from mcp_imagegen.cli import main

sys.exit(main())
