"""The `storepulse` command: a thin layer over the ingest, store_rules and dashboard packages."""
