"""Rules and alerts: rule definitions, evaluation, the alert lifecycle, delivery and back-testing."""
