"""The job store: SQLAlchemy records of jobs, events, checkpoints, uploads, and the artifact directory.

Shared by the API and the worker; imports neither FastAPI nor Celery.
"""
