"""Small pieces the daemon, the node agent, the training runtime and the client share (each a
module of its own): checkpoint URIs (uri), host:port addresses (address), channel credentials
(credentials), systemd notification (sdnotify), the metrics exporter (exporter)."""
