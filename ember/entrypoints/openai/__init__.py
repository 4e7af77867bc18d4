"""OpenAI-compatible HTTP API (``ember serve``): see :mod:`ember.entrypoints.openai.api_server`."""
