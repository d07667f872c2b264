"""Print FedHub's runtime dependencies (pyproject.toml's [project] dependencies), one a line.

    python3 docker/requirements.py [PYPROJECT] [--extra NAME ...] [--without NAME ...]

The images install these, never the dev extras, and each image leaves out what it never
imports (``--without``: the dashboard has no TensorFlow, the server and devices no
Streamlit) and adds the extras it needs (``--extra keras``: TensorFlow). The host's wheel
download (docker/wheels.sh) and the Dockerfile's build stages
both read the list from here, so it lives in pyproject.toml only.
"""

import argparse
import re
import tomllib
from pathlib import Path

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("pyproject", nargs="?", type=Path,
                    default=Path(__file__).resolve().parents[1] / "pyproject.toml")
parser.add_argument("--extra", nargs="*", default=[], metavar="NAME",
                    help="extras to add (pyproject.toml's [project.optional-dependencies])")
parser.add_argument("--without", nargs="*", default=[], metavar="NAME",
                    help="distributions to leave out")
args = parser.parse_args()
with args.pyproject.open("rb") as fh:
    project = tomllib.load(fh)["project"]
extras = project.get("optional-dependencies", {})
missing = sorted(set(args.extra) - set(extras))
if missing:
    parser.error(f"--extra {' '.join(missing)}: not among the extras ({', '.join(sorted(extras))})")
requirements = [*project["dependencies"], *(r for extra in args.extra for r in extras[extra])]


def name(requirement: str) -> str:
    """The distribution name of a requirement, normalised as in PEP 503."""
    return re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", requirement)[0]).lower()


known = {name(r) for r in requirements}
unknown = sorted({name(w) for w in args.without} - known)
if unknown:
    parser.error(f"--without {' '.join(unknown)}: not among the dependencies")
left_out = {name(w) for w in args.without}
print("\n".join(r for r in requirements if name(r) not in left_out))
