"""Rule definitions, the counter-flow state machine, watchers, alerts, promotions and back-testing."""
