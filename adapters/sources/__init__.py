"""Input adapters: foreign data mapped onto contract v1 events (plain dicts, ready to publish)."""
