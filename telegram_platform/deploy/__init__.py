"""What a server needs besides the code, packaged in the wheel, and `tp init`, which lays a host out
from it: supervisord.conf (the one copy; a clone's top-level supervisord.conf links to it), the
systemd unit and env example (templates written with Linux's usual paths), and prometheus/ (alert
rules, scrape configuration, Grafana dashboard)."""
