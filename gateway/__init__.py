"""The TLS gateway: Flask application (flask-sock websockets, REST), served by gunicorn. Never imports torch."""
