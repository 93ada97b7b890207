"""telegram-platform: run many Telegram accounts behind one REST API and one worker."""

__version__ = "0.1.0"
