"""The audit trail: one row per user message (and per form tap, feedback, stop and push) in the database's
`wecom_audit` table, written after the answer finished, kept for its term, and exported (docs/audit.md)."""
