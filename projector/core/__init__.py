"""The pure core: envelope, decoders, sequencer. No driver (Kafka, PostgreSQL, Redis,
Prometheus) is imported here, so all of it is unit-tested without I/O."""
