"""The views (and the URLconf): a sign-up and its welcome job commit together."""

from __future__ import annotations

from django.db import transaction
from django.http import HttpRequest, JsonResponse
from django.shortcuts import get_object_or_404
from django.urls import path
from django.views.decorators.http import require_GET, require_POST

from .project import Signup, psycopg_connection
from .tasks import queue, send_welcome

DECLINED_CARD = "4000000000000002"
"""The payment stand-in declines this card number (as Stripe's test mode does)."""


class CardDeclinedError(Exception):
    """The payment stand-in refused the card."""


def charge_card(card: str) -> None:
    """A stand-in for any step that can fail after the writes (here: a payment)."""
    if card == DECLINED_CARD:
        raise CardDeclinedError("card declined")


@require_POST
def sign_up(request: HttpRequest) -> JsonResponse:
    email = request.POST["email"]
    try:
        with transaction.atomic():
            signup = Signup.objects.create(email=email)
            # The same connection, in the same transaction, as the ORM's INSERT.
            job = queue.enqueue_sync(psycopg_connection(), send_welcome, signup.pk, email)
            charge_card(request.POST.get("card", ""))  # raises: the row and the job roll back
    except CardDeclinedError as ex:
        return JsonResponse({"error": str(ex)}, status=402)
    return JsonResponse({"signup": signup.pk, "welcome_job": job.id}, status=201)


@require_GET
def signup_detail(request: HttpRequest, signup_id: int) -> JsonResponse:
    signup = get_object_or_404(Signup, pk=signup_id)
    welcomed_at = signup.welcomed_at.isoformat() if signup.welcomed_at else None
    return JsonResponse({"id": signup.pk, "email": signup.email, "welcomed_at": welcomed_at})


urlpatterns = [
    path("signups", sign_up),
    path("signups/<int:signup_id>", signup_detail),
]
