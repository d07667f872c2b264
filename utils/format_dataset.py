"""Split a data set over device folders: ``python utils/format_dataset.py --devices 3``.

The original tool's script, kept: the splitter lives in :mod:`fedhub.split` (also ``fedhub split``).
"""

import sys

from fedhub.split import main

if __name__ == "__main__":
    sys.exit(main())
