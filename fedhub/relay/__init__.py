"""Relays: partial aggregation between devices and the server (``fedhub relay``).

:mod:`.sums` holds and sends the partial sums (also used by a pool's workers for their virtual
devices), :mod:`.service` is a relay's work, :mod:`.app` its HTTP routes, :mod:`.main` the command.
"""
