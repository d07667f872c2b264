"""The device runtime: the HTTP client, the training loop, trainers, attacks, secure aggregation's
device side, the worker pool (processes or Ray actors) and the launchers. ``device/device.py``
runs :mod:`fedhub.device.main`."""
