"""HTTP routers, one per concern: the OpenAI-compatible API, health probes, Prometheus metrics."""
