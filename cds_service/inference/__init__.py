"""Inference backends and the worker that runs them."""
