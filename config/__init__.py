"""Configuration shared by every Reframe Cluster component (the base of the import graph)."""

from config.settings import AmbiguousSubmitPolicy, Settings, SettingsError, load_settings

__all__ = ["AmbiguousSubmitPolicy", "Settings", "SettingsError", "load_settings"]
