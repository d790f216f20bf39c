"""Configuration shared by every Reframe Cluster component (the base of the import graph)."""

from config.settings import (
    AmbiguousSubmitPolicy,
    Settings,
    SettingsError,
    UnknownDurationPolicy,
    load_settings,
)

__all__ = ["AmbiguousSubmitPolicy", "Settings", "SettingsError", "UnknownDurationPolicy", "load_settings"]
