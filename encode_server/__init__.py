"""The encode service: image intake, preprocessing, batching, vision tower, cache, push.

settings.py (what to run with), sources.py (where bytes come from), images.py and preprocess.py
(bytes -> pixel values), cache.py, batcher.py, runner.py (the tower), outbox.py (answers),
service.py (the threads that join them), side_port.py and metrics.py (/health, /metrics),
main.py (the process). docs/encode_server.md narrates one job's life.
"""
