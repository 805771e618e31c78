"""moto's S3 as a WSGI app, for serving under gunicorn with keep-alive (see benchmarks/services.py KeepAliveS3).

`moto_server` runs on Werkzeug's development server, which closes the connection after every answer, so each of
the benchmark's object reads and writes would pay a new TCP connection that S3 and MinIO (which keep connections
alive) do not ask of a client. The same moto backend behind gunicorn keeps them alive.
"""

from moto.server import DomainDispatcherApplication, create_backend_app

app = DomainDispatcherApplication(create_backend_app)
