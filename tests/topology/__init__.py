"""The deploy/ topology run for real: in network namespaces (root), and as `make demo`."""
