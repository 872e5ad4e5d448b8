"""What the producer and the workers share, with one owner: settings, errors, the message and its queue, the
broker (app factory, connect, the one sender), model lookup, sampling ranges, the failure policy, the log format and
the Redis users' rights.

A leaf: it imports no module of models/, producer/, workers/, migrations/ or reconciler/ (docs/architecture.md,
"Who may import whom"; tests/test_contract.py holds it). Torch-free and cheap to import: nothing here loads
torch or transformers or builds a Celery app at import.
"""
