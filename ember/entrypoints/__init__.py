"""User-facing entry points: the ``ember`` command line and the OpenAI-compatible server."""
