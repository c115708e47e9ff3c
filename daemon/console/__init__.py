"""The operator console: static files served at /ui/ and the admin JSON its views read.

`routes.add_routes(app)` registers the console's routes on the daemon's app (one call, apart
from the API's own routes); `figures` keeps what the views show that no other component
keeps: a ring of recent samples, each segment's writes in flight and last write, and the
dead letters per segment, counted in the background.
"""
