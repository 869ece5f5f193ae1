#!/usr/bin/env python3
"""Start the AI Horde worker bridge. See README.md, or run with --help."""

import sys

from bridge.cli import main

if __name__ == "__main__":
    sys.exit(main())
