"""regcache settings: a typed schema, a YAML file and REGCACHE_* environment overrides."""

from config.settings import ConfigError, Settings, UpstreamSettings, load_settings

__all__ = ["ConfigError", "Settings", "UpstreamSettings", "load_settings"]
