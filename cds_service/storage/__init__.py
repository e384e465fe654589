"""Durable state behind ports (`ports`), with adapters per database (`sqlite`)."""
