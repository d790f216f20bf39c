"""A protocol-faithful emulator of fal's queue API for Luma Ray 2 Flash Reframe."""
