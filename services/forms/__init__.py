"""Dify's human-input forms answered in WeCom: the form as a template card on the answer's stream, a click (or a
typed value) on any replica claims it once, and the paused run goes on (docs/architecture.md, "Forms")."""
