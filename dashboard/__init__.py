"""FastAPI app: Jinja pages for the chain, regions and stores, and the POS / ingest HTTP API."""
