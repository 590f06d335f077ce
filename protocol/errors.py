class ProtocolError(ValueError):
    """Bytes from the network (or a file) that do not form a valid message.

    The message names the field or limit that was violated. A subclass of ValueError so
    pure codecs can raise it where callers only expect ValueError.
    """
