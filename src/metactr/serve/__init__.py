"""Serving: per-user fast adaptation behind an HTTP API."""
