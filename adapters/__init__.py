"""The outside world: inputs that turn foreign formats into contract events, and outputs.

`adapters.sources` holds the input adapters (files and feeds mapped onto contract v1 events);
they only build payloads and never touch the database: the events go through the same ingest
path as a till's (MQTT or HTTP), so what the adapters produce is checked by the contract.
"""
