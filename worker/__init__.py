"""SkinScan's Celery worker: scores chunks of stored images with the CNN and records the results."""
