"""The sending side of a sync: it walks SRC and reads files. ``source`` (listing through the
filters, directories and files opened checked) is shared with the local engine; the rest
sends to an agent over the wire (``sender.Sender``: a push here, ``sync-source`` for a pull)."""
