"""segmapd: the daemon process (config, CXone client, stores, HTTP app, CLI, lifecycle)."""
