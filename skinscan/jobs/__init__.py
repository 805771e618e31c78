"""A job's life as the web, the worker and the command line all see it: intake of an upload, dispatch to the
workers by task name, counts, metrics, cancellation and deletion. Nothing here imports Flask, the worker or
training."""
