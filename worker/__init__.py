"""Celery worker that runs rigl_core jobs. Built in a later issue."""
