"""Metrics (Prometheus) and log formatting for the service and its worker."""
