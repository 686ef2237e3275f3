"""The audit trail: the hash-chained log (`log`) and the layer
that writes one record per call decision (`layer`)."""
