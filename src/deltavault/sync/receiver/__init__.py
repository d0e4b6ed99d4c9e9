"""The receiving side of a sync: it writes DST through checked fds and handles. ``core.Receiver``
is shared by the local engine and the agent (``agent.Agent``: ``sync-agent`` for a push, here
for a pull), which answers the sender's requests."""
