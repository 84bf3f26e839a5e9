"""Optional integrations, each behind an extra.

``pgoutbox[opentelemetry]`` for tracing and ``pgoutbox[prometheus]`` for metrics.
"""
