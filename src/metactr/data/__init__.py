"""Data: readers, encoding, cold-start splits, sessions, tasks, and the shared batch format."""
