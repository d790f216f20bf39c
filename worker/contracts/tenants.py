"""Tenant names: who a job belongs to (the library's ``tenant=``, an API key's tenant).

Every job has a tenant, ``default`` when the caller names none. Idempotency keys are namespaced
by tenant (:func:`tenant_idempotency_key`), so two tenants never share one; the default tenant's
keys are kept as given, so callers that never name a tenant see the keys they chose.
"""

from __future__ import annotations

import re

#: A tenant name: lowercase letters, digits, ``_`` and ``-``, at most 40 characters.
TENANT_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,39}$"
#: The tenant of jobs whose caller names none.
DEFAULT_TENANT = "default"

_TENANT = re.compile(TENANT_PATTERN)


def check_tenant(tenant: str) -> str:
    """``tenant`` if it is a valid tenant name; :class:`ValueError` naming the rule otherwise."""
    if not isinstance(tenant, str) or not _TENANT.fullmatch(tenant):
        raise ValueError(f"tenant: {tenant!r} must match {TENANT_PATTERN}")
    return tenant


def tenant_idempotency_key(tenant: str, key: str) -> str:
    """The stored idempotency key of ``key`` for ``tenant`` (``<tenant>:<key>``; as given for the
    default tenant)."""
    return key if tenant == DEFAULT_TENANT else f"{tenant}:{key}"
