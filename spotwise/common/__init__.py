"""Small pieces the daemon, the node agent and the client share (and nothing else)."""
