"""The real Telegram backend: many accounts' TDLib clients in one process, fed by one receive thread.

- `protocol`: TDLib's JSON vocabulary (its states, the updates acted on, errors, encoding, td_execute);
- `peers`: each account's resolved peers (`PeerCache`);
- `messages`: what a message is in TDLib's words, both ways (sends built, received messages read);
- `session`: one account's client (`TdlibSession`): login steps, requests, sends, its events;
- `backend`: all clients of the process (`TdlibBackend`): the one receive thread, dispatch, TDLib's log.
"""
