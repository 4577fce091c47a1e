"""The demo chain (master data CSVs in ``demo_chain/``), the event simulator and the one-command demo."""
