"""Command-line options shared by FedHub's commands: the parser that turns every mistake into one
``error:`` line, and the option groups (``--dp``, ``--secure-aggregation``, ``--framework``) that
``server.py`` and ``fedhub.simulate`` declare once here."""
