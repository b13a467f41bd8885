"""Job service REST API (FastAPI). Built in a later issue."""
