"""Security tests: the SSRF URL policy, the guarded fetcher, the probe and callbacks through it."""
