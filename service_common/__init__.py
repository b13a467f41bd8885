"""What the API and the worker share besides the job store: the Celery app and the training task's name
(celery_app.py), and the log context and line format (log_context.py).

A neutral home, so that `api` and `worker` never import each other; it imports neither of them.
"""
