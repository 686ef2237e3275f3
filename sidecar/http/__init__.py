"""HTTP at the edges: the listener, the edge that turns requests into calls, the transport
to upstreams, WebSocket relaying, header hygiene, problem+json answers and the guards."""
