#!/usr/bin/env python
"""`python sweeps/tune.py ARGS` is `a2b tune ARGS` (a2b_dist/sweeps/tune.py); install first: make install."""
import sys
from a2b_dist.cli import script
if __name__ == "__main__":
    sys.exit(script("tune", "sweeps/tune.py"))
