"""`tflow serve`: an OpenAI-compatible HTTP server that batches concurrent requests, a delta per row.

`protocol` (OpenAI's schema), `batcher` (dynamic batching on one worker thread), `metrics`
(Prometheus), `app` (the FastAPI routes, auth and errors), `server` (binding and uvicorn).
"""
