#!/usr/bin/env python
"""`python jobs/submit.py ARGS` is `a2b submit ARGS` (a2b_dist/jobs/submit.py); install first: make install."""
import sys
from a2b_dist.cli import script
if __name__ == "__main__":
    sys.exit(script("submit", "jobs/submit.py"))
