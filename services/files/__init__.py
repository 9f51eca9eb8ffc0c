"""Files Dify makes (documents, charts, generated images, workflow outputs) delivered to the WeCom user: found in
the answer's events, fetched safely from the bot's Dify, and sent inline, as a signed link to the gateway itself,
or (long-connection mode) uploaded to WeCom. docs/architecture.md, "Files Dify makes"."""
