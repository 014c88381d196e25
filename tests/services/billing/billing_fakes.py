"""Test doubles of the billing tests that are not mocks: a clock that moves when told."""

from __future__ import annotations


class FakeClock:
    """An injectable clock (Unix seconds) that only moves when told."""

    def __init__(self, start: float = 1_750_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds
