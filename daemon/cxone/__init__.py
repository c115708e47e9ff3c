"""The CXone HTTP client: settings, authentication (OpenID discovery, grants) and API calls."""

from daemon.cxone.auth import TokenManager
from daemon.cxone.client import HttpCXoneClient, ResponseHook
from daemon.cxone.settings import CXonePaths, CXoneSettings

__all__ = ["CXonePaths", "CXoneSettings", "HttpCXoneClient", "ResponseHook", "TokenManager"]
