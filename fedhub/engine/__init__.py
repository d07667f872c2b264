"""FedHub's engine: wire format, aggregation, round coordination and storage.

Nothing in this package imports Flask or TensorFlow, so it is unit-testable in
milliseconds and reusable by any transport. The HTTP layer (``api``) and the
Keras code (``model``, ``device``) sit on top of it, never the other way round.
"""

__version__ = "0.1.0"
