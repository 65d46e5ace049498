"""Web gateway: OpenAI-compatible HTTP API with SSE streaming, Prometheus metrics, and a playground."""
