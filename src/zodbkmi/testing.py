"""Test support: a facility and a key holder with a fixed, public test key.

The testing KEK and DEK are derived from public strings, so every
:class:`TestingKeyManagementFacility` (in any directory, in any process) can
read what another one wrote: a test database can be reused.  They protect
nothing; never use them outside tests.
"""
import hashlib
import socket

import zope.component.testing
from zope.interface import implementer

from zodbkmi import facility
from zodbkmi.interfaces import IKeyHolder
from zodbkmi.kek import AESKeyEncryptingKey

KeyEncryptingKey = hashlib.sha256(b'zodbkmi public testing KEK').digest()
TESTING_DEK_ID = hashlib.sha256(b'zodbkmi public testing DEK id').digest()[:16]
_TESTING_DEK = hashlib.sha256(b'zodbkmi public testing DEK').digest()


class TestingKeyManagementFacility(facility.KeyManagementFacility):
    """A master facility that always hands out the same (public) KEK."""

    def __init__(self, storage_dir, **kw):
        super().__init__(storage_dir, **kw)
        kek = AESKeyEncryptingKey(KeyEncryptingKey)
        if TESTING_DEK_ID.hex() not in self:
            self.create_key(kek, _dek=_TESTING_DEK, _dek_id=TESTING_DEK_ID)

    def generate(self):
        return KeyEncryptingKey


@implementer(IKeyHolder)
class TestingKeyHolder:
    """A key holder with the public testing KEK."""

    key = KeyEncryptingKey
    previous_keys = ()

    def __repr__(self):
        return '<TestingKeyHolder>'


def setUp(test=None):
    """Reset the component registry (for doctests and unit tests)."""
    zope.component.testing.setUp(test)


def tearDown(test=None):
    zope.component.testing.tearDown(test)


def setupRestApi(localFacility, masterFacility):
    """Wire ``localFacility`` (a LocalKeyManagementFacility) to the REST API
    of ``masterFacility`` in this process, without a socket, as keas.kmi's
    function of the same name.  A fresh admin token is made for the pair.
    Return the WSGI application."""
    from zodbkmi import rest
    token = rest.new_token()
    tokens = rest.TokenTable([('testing', 'admin', rest.hash_token(token))])
    app = rest.KeyServerApp(masterFacility, tokens)
    localFacility._transport = rest.WSGITransport(app)
    localFacility._token = token
    localFacility.clear_cache()
    return app


def free_port(host='127.0.0.1'):
    """A TCP port that is free on ``host`` (loopback) right now, for the
    servers that tests and benchmarks start."""
    s = socket.socket()
    try:
        s.bind((host, 0))
        return s.getsockname()[1]
    finally:
        s.close()
