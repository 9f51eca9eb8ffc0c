"""What a message asks for: commands (/new, /help), quotes and mentions, media to attach, the welcome; a question
becomes a stream (services/streams)."""
