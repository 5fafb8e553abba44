#!/usr/bin/env python
"""`python jobs/status.py ARGS` is `a2b status ARGS` (a2b_dist/jobs/status.py); install first: make install."""
import sys
from a2b_dist.cli import script
if __name__ == "__main__":
    sys.exit(script("status", "jobs/status.py"))
