"""A FastAPI app that enqueues in its request's transaction; a worker process runs the jobs.

Run the demo from the repository root: ``python -m examples.fastapi_app.run_demo``.
"""
