"""Prometheus metrics: what the platform records (definitions.py), the multiprocess files every
process writes them to (files.py) and one scrape's exposition (exposition.py). What is read only at
scrape time lives beside the route that serves it (api/scrape.py)."""
