"""Runnable examples: a second trainer (``examples.digits``) and the Python API
(``examples/python_api.py``)."""
