"""The CSI Node service of ``shoal agent`` (stage, publish, stats on this host)."""
