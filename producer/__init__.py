"""The producer library: validate reframe requests and enqueue jobs on Redis."""
