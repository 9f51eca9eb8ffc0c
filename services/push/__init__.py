"""The push API: messages from outside a conversation (a Dify workflow, a scheduler) sent through a long-connection
bot's WebSocket, once."""
