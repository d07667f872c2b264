"""A FedHub device: ``python device/device.py 4000 device1`` (or with flags; see ``--help``).

The original tool's form, kept: the device lives in :mod:`fedhub.device.main` (also
``fedhub device``). FedHub must be installed (``make venv``, or ``pip install -e .``).
"""

import sys

from fedhub.device.main import main

if __name__ == "__main__":
    sys.exit(main())
