"""What the producer and the workers share, with one owner: settings, errors, the message and its queue, the
broker (app factory, connect, the one sender), model lookup, sampling ranges and the reconciler's sweep.

Torch-free and cheap to import: nothing here loads torch or transformers, builds a Celery app at import, or
imports a module of producer/ or workers/ (docs/architecture.md, "Who may import whom").
"""
