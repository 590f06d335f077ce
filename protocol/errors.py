class ProtocolError(ValueError):
    """Bytes from the network (or a file) that do not form a valid message.

    The message names the field or limit that was violated. A subclass of ValueError so
    pure codecs can raise it where callers only expect ValueError.
    """


class MessageTooLarge(ProtocolError):
    """A message over its kind's size limit.

    Raised by `encode` as well, so a sender can tell "split this or send it as a blob" apart
    from a record that breaks a wire rule (which splitting would not fix).
    """
