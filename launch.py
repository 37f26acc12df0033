"""Launch an rlhf_dist job: ``python launch.py [--config configs/X.yaml] [key=value ...]``."""

import sys

from rlhf_dist.launch import main

if __name__ == "__main__":
    sys.exit(main())
