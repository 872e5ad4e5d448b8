"""Moved to contract.settings (the one owner of what producer and workers share); kept for old imports."""
from contract.settings import ENV_PREFIX, Settings, get_settings, redact

__all__ = ["ENV_PREFIX", "Settings", "get_settings", "redact"]
