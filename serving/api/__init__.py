"""
The OpenAI-compatible HTTP API: app (routes, streaming, auth, the UI's files), schemas (request and
response bodies) and errors (OpenAI's error shape for everything that goes wrong).
"""
