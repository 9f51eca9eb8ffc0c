"""The HTTP routes beside app.py's: the callback route answered in front of Flask (callback_route.py) and the
operator's page (admin.py, with its templates and static files). They parse, call the services, and render."""
