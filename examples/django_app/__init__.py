"""A Django project in a few files: a view enqueues with `Queue.enqueue_sync` in ``atomic()``.

Run the demo from the repository root: ``python -m examples.django_app.run_demo``.
"""
