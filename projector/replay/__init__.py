"""Replay: asking the write side for the events of a gap (channels), and a reference responder
that serves such requests from an event-store table."""
