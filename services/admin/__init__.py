"""The operator's page, /admin: bots, live answers with Stop, the audit trail's search and CSV, quotas with Reset
(docs/operations.md, "The operator's page")."""
