"""Run the Django example end to end.

From the repository root: ``python -m examples.django_app.run_demo``. It uses
``$PGOUTBOX_DSN``, or the local server at 127.0.0.1:5432 (user postgres, database test).

It calls the view through Django's test client: one sign-up commits with its
welcome job; one is declined, so its row and its job roll back. Then an
in-process worker runs the job (`pgoutbox.testing.drain`; in production,
``python -m pgoutbox.worker examples.django_app.tasks:queue``).
"""

from __future__ import annotations

import asyncio

from asgiref.sync import sync_to_async
from django.db import connection, connections
from django.test import Client
from psycopg import sql

from pgoutbox.testing import drain

from .project import CREATE_TABLE, Signup
from .tasks import queue, send_welcome
from .views import DECLINED_CARD


def jobs_for(email: str) -> int:
    """How many welcome jobs exist for `email` (reads pgoutbox's jobs table)."""
    with connection.cursor() as cur:
        cur.execute(
            sql.SQL("SELECT count(*) FROM {}.jobs WHERE task = %s AND args->>'email' = %s").format(
                sql.Identifier(queue.schema)
            ),
            [send_welcome.name, email],
        )
        row = cur.fetchone()
    return 0 if row is None else int(row[0])


async def run_jobs() -> None:
    """Run the waiting jobs with an in-process worker, then stop it."""
    await drain(queue, timeout=15)
    # The async ORM ran in asgiref's thread: close the connection it opened there.
    await sync_to_async(connections.close_all)()


def main() -> None:
    applied = asyncio.run(queue.migrate())
    print(f"setup: pgoutbox schema {queue.schema!r}, migrations applied now: {applied}")
    with connection.cursor() as cur:
        cur.execute(CREATE_TABLE)

    client = Client()
    response = client.post("/signups", {"email": "ada@example.com", "card": "4242424242424242"})
    created = response.json()
    signup_id = created["signup"]
    print(
        f"client: POST /signups -> {response.status_code}, sign-up {signup_id}, "
        f"welcome job {created['welcome_job']}"
    )

    response = client.post("/signups", {"email": "mallory@example.com", "card": DECLINED_CARD})
    print(
        f"client: POST /signups with a declined card -> {response.status_code}; "
        f"sign-ups for mallory@example.com: "
        f"{Signup.objects.filter(email='mallory@example.com').count()}, "
        f"welcome jobs: {jobs_for('mallory@example.com')}"
    )

    asyncio.run(run_jobs())

    response = client.get(f"/signups/{signup_id}")
    print(f"client: GET /signups/{signup_id} -> welcomed at {response.json()['welcomed_at']}")
    connections.close_all()


if __name__ == "__main__":
    main()
