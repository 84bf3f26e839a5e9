"""The queue and its task. Importing it sets Django up (via `project`), so a worker
process can serve it too: ``python -m pgoutbox.worker examples.django_app.tasks:queue``.
"""

from __future__ import annotations

from django.utils import timezone

import pgoutbox

from .project import DSN, Signup

queue = pgoutbox.Queue(DSN, schema="example_django")


@queue.task(name="accounts.send_welcome", queue="emails")
async def send_welcome(signup_id: int, email: str) -> None:
    """Send the welcome email, then record it (Django's async ORM: asyncio only)."""
    print(f"  worker: welcome email to {email} (sign-up {signup_id})")
    await Signup.objects.filter(pk=signup_id).aupdate(welcomed_at=timezone.now())
