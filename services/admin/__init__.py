"""The operator's page's work, apart from Flask (its routes: web/admin.py): bots, live answers with Stop, the audit
trail's search and CSV, quotas with Reset (docs/operations.md, "The operator's page")."""
