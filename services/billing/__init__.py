"""Billing: identity and money for Kiln (``kiln.billing.v1.BillingService``).

* :mod:`~services.billing.store` — the database (SQLite by default, PostgreSQL
  when ``KILN_DATABASE_URL`` says so) and its versioned migrations.
* :mod:`~services.billing.ledger` — accounts, API keys, reservations and the
  ledger; every balance change is a ledger row.
* :mod:`~services.billing.pricing` — the one pricing function and the bulk
  discounts.
* :mod:`~services.billing.auth` — API keys and JWTs to accounts.
* :mod:`~services.billing.servicer` / :mod:`~services.billing.server` — the
  gRPC service (``create_service``).
* :mod:`~services.billing.admin` — ``kiln admin ...`` and the demo account.
"""

from services.common.capability import Capability

CAPABILITY = Capability(
    name="billing",
    service="kiln.billing.v1.BillingService",
    port=50051,
    server="services.billing.server:create_service",
    billing=True,
)
