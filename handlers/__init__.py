"""Example handlers for the seed cases; see README "Writing a handler"."""
