"""The runner: the only part that talks to more than one layer (source, core, store)."""
