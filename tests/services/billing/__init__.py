"""Tests of the billing service (services/billing)."""
