"""Operating the node: logging set-up, Prometheus metrics, the HTTP status server."""
