"""Integrations with other libraries; each is imported only when asked for by name
(``import robust_amo`` imports none of them)."""
