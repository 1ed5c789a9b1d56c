"""ekko-api: the tenant API (issue 19). A WSGI application behind keystonemiddleware's auth_token:
conf.py (oslo.config), policy.py (oslo.policy defaults in code), index.py (SQLite, rebuilt from the
stores), app.py (the Flask app: /v1), cmd.py (the `ekko-api` console script: serve, reindex).
bus.py (agents on oslo.messaging) and glance.py (restore as an image) are called, not owned, here."""
