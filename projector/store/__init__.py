"""Stores: where views and projector's own state live. One transaction per batch."""
