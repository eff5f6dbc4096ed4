"""``metactr bench``: datasets x methods x seeds for the RML and MetaSelector protocols."""
