#!/usr/bin/env python
"""`python shards/build.py ARGS` is `a2b build ARGS` (a2b_dist/build.py); install first: make install."""
import sys
from a2b_dist.cli import script
if __name__ == "__main__":
    sys.exit(script("build", "shards/build.py"))
