"""Command-line options shared by FedHub's commands: the parser that turns every mistake into one
``error:`` line (the run's settings and their flags are ``fedhub.settings``')."""
