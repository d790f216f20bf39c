"""Celery task messages in kombu's Redis envelope, built by hand.

Building the envelope ourselves lets a producer write a job record and its task message in one
atomic Redis script (no orphan records, no orphan messages) and pipeline thousands per round trip;
``Celery.send_task`` costs ~1 ms each and cannot join a transaction. The format is Celery's task
protocol 2 inside kombu's virtual-transport envelope; an integration test proves a real worker
consumes it.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import uuid
from typing import Any

SUBMIT_TASK = "reframe.submit"
CALLBACK_TASK = "reframe.callback"
CANCEL_TASK = "reframe.cancel"

_EMBED = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}


def _origin() -> str:
    return f"{os.getpid()}@{socket.gethostname()}"


def task_message(task: str, args: list[Any], *, queue: str, priority: int, task_id: str | None = None) -> str:
    """The JSON text kombu's Redis transport stores for one task message."""
    task_id = task_id or uuid.uuid4().hex
    body = json.dumps([args, {}, _EMBED], separators=(",", ":")).encode()
    envelope = {
        "body": base64.b64encode(body).decode(),
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": {
            "lang": "py",
            "task": task,
            "id": task_id,
            "shadow": None,
            "eta": None,
            "expires": None,
            "group": None,
            "group_index": None,
            "retries": 0,
            "timelimit": [None, None],
            "root_id": task_id,
            "parent_id": None,
            "argsrepr": repr(args),
            "kwargsrepr": "{}",
            "origin": _origin(),
            "ignore_result": True,
        },
        "properties": {
            "correlation_id": task_id,
            "delivery_mode": 2,
            "delivery_info": {"exchange": "", "routing_key": queue},
            "priority": priority,
            "body_encoding": "base64",
            "delivery_tag": str(uuid.uuid4()),
        },
    }
    return json.dumps(envelope, separators=(",", ":"))


def decode_task(envelope: Any) -> tuple[dict[str, Any], list[Any], dict[str, Any]] | None:
    """(headers, args, kwargs) of a task message in kombu's envelope (text, bytes or a parsed dict).

    ``None`` for anything unreadable. The body is task protocol 2, ``[args, kwargs, embed]``,
    base64 per ``properties.body_encoding``.
    """
    try:
        doc = envelope if isinstance(envelope, dict) else json.loads(envelope)
        body: Any = doc.get("body", "")
        if (doc.get("properties") or {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        args, kwargs, *_ = json.loads(body)
        return dict(doc.get("headers") or {}), list(args), dict(kwargs)
    except (ValueError, TypeError, KeyError, IndexError, AttributeError):
        return None


def submit_job_id(envelope: Any) -> str | None:
    """The job id of a ``reframe.submit`` message; ``None`` for other tasks and anything unreadable."""
    task = decode_task(envelope)
    if task is None or task[0].get("task") != SUBMIT_TASK:
        return None
    _headers, args, kwargs = task
    job_id = args[0] if args else kwargs.get("job_id")
    return str(job_id) if job_id else None
