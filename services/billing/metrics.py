"""Billing's credit counters, in its service's metrics registry (``services.common.metrics``).

All in hundredths of a credit, counted by the servicer when the RPC that moves them succeeds:

* ``kiln_credits_reserved_total``: new holds (Authorize, CreateTask's hold, Reserve);
* ``kiln_credits_committed_total``: the amount charged by a Commit;
* ``kiln_credits_released_total``: what a Commit returns of its hold plus what a Release
  returns (holds that expire are not counted here: the sweep reports only how many).

A retried Commit or Release of a reservation already settled answers the same reservation and
is counted again: these are rates for dashboards, the ledger is the books.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter


class CreditMetrics:
    """The three credit counters of one billing service."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        registry = registry or CollectorRegistry()
        self.reserved = Counter(
            "kiln_credits_reserved", "Credits held for requests, in hundredths.", registry=registry
        )
        self.committed = Counter(
            "kiln_credits_committed", "Credits charged by commits, in hundredths.", registry=registry
        )
        self.released = Counter(
            "kiln_credits_released",
            "Held credits returned to balances (by a commit or a release), in hundredths.",
            registry=registry,
        )

    def hold(self, amount: int) -> None:
        self.reserved.inc(amount)

    def commit(self, held: int, charged: int) -> None:
        self.committed.inc(charged)
        self.released.inc(max(0, held - charged))

    def release(self, amount: int) -> None:
        self.released.inc(amount)
