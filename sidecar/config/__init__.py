"""Configuration: the typed settings tree (`settings`), durations and
sizes (`units`), and the YAML loader (`loader`)."""
