"""The HTTP service of Reframe Cluster (issue #12): ``reframe serve``.

:func:`create_app` builds the FastAPI app from the settings; :func:`reframe.api.server.serve` runs
it on uvicorn. API keys: :mod:`reframe.api.keys`. Nothing happens at import time.
"""

from reframe.api.app import create_app

__all__ = ["create_app"]
