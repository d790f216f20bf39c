"""Reframe Cluster workers: Celery tasks that drive reframe jobs through fal under flow control.

Importing this package does nothing; the Celery app is built by :func:`worker.app.create_app`.
"""
