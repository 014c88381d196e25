"""Versioned schema migrations of the billing database (``NNNN_name.sql``, applied in order).

Files are never edited once released: a change is a new file with the next
number. One SQL dialect serves SQLite and PostgreSQL; the only difference is
the auto-numbered key, written as the token ``{{IDENTITY_PK}}``.
"""
