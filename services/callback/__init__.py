"""Callback mode's front door: WeCom POSTs an encrypted callback to the bot's URL, answered on WSGI in front of the
Flask app (web/callback_route.py); the envelope verifies and decrypts it (and encrypts the reply), the handler turns
it into a message, a stream poll or an event, and answers."""
