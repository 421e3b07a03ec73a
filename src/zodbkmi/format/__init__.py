"""All byte formats of zodbkmi; nothing else builds or parses ciphertext.

- :mod:`zodbkmi.format.envelope`: records and object states (AES-256-GCM).
- :mod:`zodbkmi.format.wrapped`: data keys wrapped by a key encrypting key.

Each format is versioned, specified in ``docs/format.rst`` and pinned by the
JSON test vectors in ``tests/vectors/``.
"""
