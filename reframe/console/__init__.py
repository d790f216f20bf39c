"""The operator console: server-rendered pages under ``/console`` of ``reframe serve``.

The pages hold no data. Their JavaScript (``static/*.js``) keeps the API key the operator signs in
with in the tab's ``sessionStorage`` and calls the public API (``/v1``) with it as a bearer token,
so the console can do nothing the API would refuse that key. See README, "Operator console".
"""

from reframe.console.pages import install

__all__ = ["install"]
