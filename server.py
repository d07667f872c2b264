"""FedHub server: ``python server.py 4000`` (or ``--port 4000`` and more; see ``--help``).

The original tool's form, kept: the server lives in :mod:`fedhub.serve` (also ``fedhub server``).
"""

import sys

from fedhub.serve import main

if __name__ == "__main__":
    sys.exit(main())
