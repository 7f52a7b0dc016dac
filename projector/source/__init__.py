"""Sources: where events come from (Kafka)."""
