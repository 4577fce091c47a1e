"""The event store: settings, database, schema, event contract, batch writer and MQTT worker."""
