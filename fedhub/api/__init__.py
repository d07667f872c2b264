"""FedHub's HTTP layer: Flask blueprints over the engine (``fedhub``).

Requests flow one way: HTTP -> engine -> storage. Nothing here aggregates,
stores or trains; it parses, authenticates and answers.
"""

from .app import build_app

__all__ = ["build_app"]
