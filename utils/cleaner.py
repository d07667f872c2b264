"""Clean run-time state on purpose: ``python utils/cleaner.py [--state-dir DIR]``.

The original tool's script, kept: the cleaner lives in :mod:`fedhub.cleaner` (also ``fedhub clean``).
"""

import sys

from fedhub.cleaner import main

if __name__ == "__main__":
    sys.exit(main())
