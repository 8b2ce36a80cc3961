"""Small pieces the daemon, the node agent and the training runtime share (each a module of
its own): checkpoint URIs, host:port addresses, systemd notification, the metrics exporter."""
