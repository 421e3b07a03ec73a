"""KMIP: a key encrypting key inside an enterprise key manager (suite 6).

Needs the ``kmip`` extra (PyKMIP, used only to encode and decode KMIP's
TTLV messages; the connections are ours).  An AES-256 symmetric key
object in a KMIP server, named by its unique identifier, wraps each DEK
with the server's ``Encrypt`` operation: AES-256-GCM, an IV the server
chooses, the wrapped-DEK header as authenticated additional data and a
128 bit tag (KMIP 1.4).  ``Decrypt`` unwraps.  The key never leaves the
server, unless ``fetchKey`` asks for the weaker mode that fetches it with
``Get`` (:class:`KmipFetchedKeyEncryptingKey`).

The blob is ``n (1) || IV (n, 12 to 16) || ciphertext (32) || tag (16)``,
the same whether the server or a fetched key made it.  The KEK id is
``kmip:<unique identifier>``; KMIP keys have no versions, so a rotation
creates a new key object (:func:`rotate_kek`) and the old one stays for
unwrapping.  :func:`revoke_kek` and :func:`destroy_kek` end a key's life.

Connections: TLS 1.2 or newer with a client certificate, a timeout on
every connect, read and write, a bounded pool of connections per
:class:`KmipClient`, and one reconnect when a pooled connection turns out
to be closed by the server.  Errors are
:class:`~zodbkmi.exceptions.KmipError` (a
:class:`~zodbkmi.exceptions.KeySourceError`) naming the server and the key,
never a credential.
"""
import os
import re
import socket
import ssl
import struct
import threading
import time
import warnings

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from zope.interface import implementer

from zodbkmi.exceptions import AuthenticationError
from zodbkmi.exceptions import KeySourceError
from zodbkmi.exceptions import KmipError
from zodbkmi.exceptions import TruncatedDataError
from zodbkmi.fileutil import read_secret_file
from zodbkmi.format import wrapped
from zodbkmi.interfaces import IKeyEncryptingKey

# PyKMIP's package imports its SQLAlchemy models (kmip.pie), which warn
# about SQLAlchemy 2 on import: not ours to fix, not the user's to see.
with warnings.catch_warnings():
    warnings.simplefilter('ignore')
    try:
        from kmip.core import enums as _enums
        from kmip.core import exceptions as _kmip_exceptions
        from kmip.core import objects as _objects
        from kmip.core import primitives as _primitives
        from kmip.core.attributes import \
            CryptographicParameters as _CryptoParams
        from kmip.core.attributes import UniqueIdentifier as _UID
        from kmip.core.factories.attributes import AttributeFactory as _AF
        from kmip.core.messages import contents as _contents
        from kmip.core.messages import messages as _messages
        from kmip.core.messages import payloads as _payloads
        from kmip.core.utils import BytearrayStream as _Stream
    except ImportError:   # pragma: no cover
        _enums = None

DEFAULT_PORT = 5696
DEFAULT_POOL_SIZE = 4
TAG_SIZE = 16
MIN_IV_SIZE = 12
MAX_IV_SIZE = 16
MAX_MESSAGE = 1 << 20
KEY_ID_PREFIX = 'kmip:'
_UID_RE = re.compile(r'[A-Za-z0-9._:+=-]{1,200}\Z')

# Authenticated additional data and the GCM tag are fields of KMIP 1.4.
_VERSION = (1, 4)


def _require():
    if _enums is None:   # pragma: no cover
        raise KeySourceError('KMIP sources need PyKMIP: install '
                             'zodbkmi[kmip]')


def kmip_key_id(uid):
    """The KEK id of the KMIP key object ``uid``: ``kmip:<uid>``."""
    if not isinstance(uid, str) or not _UID_RE.match(uid):
        raise KeySourceError('KMIP unique identifier %r is not usable in a '
                             'KEK id (1 to 200 letters, digits and '
                             '"._:+=-")' % str(uid)[:60])
    return KEY_ID_PREFIX + uid


def _enum_name(value):
    name = getattr(value, 'name', None) or str(value)
    return name.replace('_', ' ').title()


class KmipClient:
    """A bounded pool of TLS connections to one KMIP server.

    ``host`` and ``port`` name the server, ``cert_file`` and ``key_file``
    the client certificate and its private key (mode 0600), ``ca_file`` the
    CA certificates that sign the server's certificate.  ``timeout``
    bounds each connect, read and write, and the wait for a free
    connection when ``pool_size`` requests are already under way.
    ``server_name`` is the name checked in the server's certificate
    (default ``host``).
    """

    def __init__(self, host, port=DEFAULT_PORT, cert_file=None,
                 key_file=None, ca_file=None, timeout=5.0,
                 pool_size=DEFAULT_POOL_SIZE, server_name=None):
        _require()
        self.host = host
        self.port = port
        self.timeout = timeout
        self.server = 'kmip://%s:%d' % (host, port)
        self.server_name = server_name or host
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            ctx.load_verify_locations(ca_file)
        except (OSError, ssl.SSLError, TypeError) as e:
            raise KmipError('%s: cannot load the CA file %s (%s)'
                            % (self.server, ca_file,
                               getattr(e, 'strerror', None)
                               or type(e).__name__), self.server) from None
        if key_file is not None:
            read_secret_file(key_file, 'KMIP client key')   # mode check
        try:
            ctx.load_cert_chain(cert_file, key_file)
        except (OSError, ssl.SSLError, TypeError) as e:
            raise KmipError('%s: cannot load the client certificate %s and '
                            'key %s (%s)' % (self.server, cert_file, key_file,
                                             getattr(e, 'strerror', None)
                                             or type(e).__name__),
                            self.server) from None
        self._context = ctx
        self._idle = []
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(pool_size)
        self._factory = _AF()

    def __repr__(self):
        return '<%s %s>' % (type(self).__name__, self.server)

    # -- connections ------------------------------------------------------

    def _connect(self):
        try:
            raw = socket.create_connection((self.host, self.port),
                                           timeout=self.timeout)
        except socket.timeout:
            raise KmipError('%s: no connection within %gs'
                            % (self.server, self.timeout),
                            self.server) from None
        except OSError as e:
            raise KmipError('%s: cannot connect (%s)'
                            % (self.server, e.strerror or type(e).__name__),
                            self.server) from None
        # One small request, one small answer: do not wait for ACKs.
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            conn = self._context.wrap_socket(
                raw, server_hostname=self.server_name)
        except socket.timeout:
            raw.close()
            raise KmipError('%s: TLS handshake timed out after %gs'
                            % (self.server, self.timeout),
                            self.server) from None
        except (ssl.SSLError, OSError) as e:
            raw.close()
            raise KmipError('%s: TLS handshake failed (%s)'
                            % (self.server, _tls_reason(e)),
                            self.server) from None
        conn.settimeout(self.timeout)
        return conn

    def _recv(self, conn, size):
        data = b''
        while len(data) < size:
            chunk = conn.recv(size - len(data))
            if not chunk:
                raise EOFError
            data += chunk
        return data

    def _exchange(self, conn, request):
        """Send ``request``; return the answer's bytes.  An EOFError means
        the server closed the connection before answering."""
        conn.sendall(request)
        head = self._recv(conn, 8)
        size = struct.unpack('!I', head[4:])[0]
        if size > MAX_MESSAGE:
            raise KmipError('%s: answer of %d bytes refused'
                            % (self.server, size), self.server)
        return head + self._recv(conn, size)

    def close(self):
        """Close the idle connections (busy ones close when returned)."""
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            _close(conn)

    def __del__(self):
        # A client dropped without close() (a KEK made by a ZConfig or
        # ZCML configuration lives as long as its storage): close quietly.
        idle = getattr(self, '_idle', None)
        if idle:
            self._idle = []
            for conn in idle:
                _close(conn)

    # -- requests ---------------------------------------------------------

    def _encode(self, operation, payload):
        header = _messages.RequestHeader(
            protocol_version=_contents.ProtocolVersion(*_VERSION),
            batch_count=_contents.BatchCount(1))
        item = _messages.RequestBatchItem(
            operation=_contents.Operation(operation),
            request_payload=payload)
        stream = _Stream()
        _messages.RequestMessage(request_header=header,
                                 batch_items=[item]).write(
            stream, _enums.KMIPVersion.KMIP_1_4)
        return bytes(stream.buffer)

    def _send(self, request, what):
        """Exchange ``request`` on a pooled connection; reconnect once when
        a reused connection was closed by the server before answering."""
        if not self._slots.acquire(timeout=self.timeout):
            raise KmipError('%s: %s: no free connection within %gs'
                            % (self.server, what, self.timeout), self.server)
        try:
            for attempt in (0, 1):
                with self._lock:
                    conn = self._idle.pop() if self._idle else None
                reused = conn is not None
                if conn is None:
                    conn = self._connect()
                try:
                    answer = self._exchange(conn, request)
                except (EOFError, ConnectionError, ssl.SSLEOFError,
                        ssl.SSLZeroReturnError):
                    _close(conn)
                    if reused and attempt == 0:
                        continue
                    raise KmipError(
                        '%s: %s: the server closed the connection (is the '
                        'client certificate accepted?)' % (self.server, what),
                        self.server) from None
                except socket.timeout:
                    _close(conn)
                    raise KmipError('%s: %s: no answer within %gs'
                                    % (self.server, what, self.timeout),
                                    self.server) from None
                except ssl.SSLError as e:
                    _close(conn)
                    raise KmipError('%s: %s: TLS error (%s)'
                                    % (self.server, what, _tls_reason(e)),
                                    self.server) from None
                except OSError as e:
                    _close(conn)
                    raise KmipError('%s: %s: %s' % (
                        self.server, what, e.strerror or type(e).__name__),
                        self.server) from None
                except BaseException:
                    _close(conn)
                    raise
                with self._lock:
                    self._idle.append(conn)
                return answer
        finally:
            self._slots.release()

    def call(self, operation, payload, what):
        """Run one KMIP ``operation`` (a ``kmip.core.enums.Operation``) with
        its request ``payload``; return the response payload.

        ``what`` names the key (or the object) in error messages.  A
        failed operation raises :class:`~zodbkmi.exceptions.KmipError`
        with the KMIP result reason (``reason``) and the server's message,
        cut to 200 characters.
        """
        label = '%s of %s' % (_enum_name(operation), what)
        answer = self._send(self._encode(operation, payload), label)
        response = _messages.ResponseMessage()
        try:
            response.read(_Stream(answer), _enums.KMIPVersion.KMIP_1_4)
            item = response.batch_items[0]
            status = item.result_status.value
        except (_kmip_exceptions.KmipError, ValueError, TypeError,
                IndexError, AttributeError, struct.error):
            raise KmipError('%s: %s: malformed answer'
                            % (self.server, label), self.server) from None
        if status == _enums.ResultStatus.SUCCESS:
            return item.response_payload
        reason = (item.result_reason.value if item.result_reason is not None
                  else None)
        message = (item.result_message.value
                   if item.result_message is not None else '')
        message = ' '.join(str(message).split())[:200]
        raise KmipError('%s: %s refused: %s%s'
                        % (self.server, label,
                           _enum_name(reason) if reason else 'failed',
                           ' (%s)' % message if message else ''),
                        self.server, reason)

    # -- key objects ------------------------------------------------------

    def attributes(self, uid):
        """A dict of the key object's ``state``, ``object_type``,
        ``algorithm`` (KMIP enums) and ``length`` (bits), read with
        GetAttributes."""
        payload = self.call(
            _enums.Operation.GET_ATTRIBUTES,
            _payloads.GetAttributesRequestPayload(
                unique_identifier=uid,
                attribute_names=['State', 'Object Type',
                                 'Cryptographic Algorithm',
                                 'Cryptographic Length']),
            'key %s' % uid)
        names = {'State': 'state', 'Object Type': 'object_type',
                 'Cryptographic Algorithm': 'algorithm',
                 'Cryptographic Length': 'length'}
        result = {}
        for attribute in payload.attributes or ():
            name = names.get(attribute.attribute_name.value)
            if name is not None:
                result[name] = attribute.attribute_value.value
        return result

    def locate(self, name):
        """The unique identifiers of the objects named ``name``."""
        payload = self.call(
            _enums.Operation.LOCATE,
            _payloads.LocateRequestPayload(attributes=[
                self._factory.create_attribute(_enums.AttributeType.NAME,
                                               name)]),
            'name %r' % name[:60])
        return list(payload.unique_identifiers or ())

    def create_key(self, name=None, activate=True):
        """Create an AES-256 key for Encrypt and Decrypt, and activate it
        unless ``activate`` is false; return its unique identifier."""
        factory = self._factory
        attributes = [
            factory.create_attribute(
                _enums.AttributeType.CRYPTOGRAPHIC_ALGORITHM,
                _enums.CryptographicAlgorithm.AES),
            factory.create_attribute(
                _enums.AttributeType.CRYPTOGRAPHIC_LENGTH, 256),
            factory.create_attribute(
                _enums.AttributeType.CRYPTOGRAPHIC_USAGE_MASK,
                [_enums.CryptographicUsageMask.ENCRYPT,
                 _enums.CryptographicUsageMask.DECRYPT])]
        if name is not None:
            attributes.append(factory.create_attribute(
                _enums.AttributeType.NAME, name))
        payload = self.call(
            _enums.Operation.CREATE,
            _payloads.CreateRequestPayload(
                object_type=_enums.ObjectType.SYMMETRIC_KEY,
                template_attribute=_objects.TemplateAttribute(
                    attributes=attributes)),
            'a new AES-256 key' if name is None else 'key %r' % name[:60])
        uid = payload.unique_identifier
        kmip_key_id(uid)
        if activate:
            self.activate(uid)
        return uid

    def activate(self, uid):
        """Activate the key object ``uid`` (Pre-Active to Active)."""
        self.call(_enums.Operation.ACTIVATE,
                  _payloads.ActivateRequestPayload(
                      unique_identifier=_UID(uid)),
                  'key %s' % uid)

    def revoke(self, uid, compromised=False, message=None):
        """Revoke the key object ``uid``: it becomes Deactivated (or
        Compromised) and encrypts no more."""
        code = (_enums.RevocationReasonCode.KEY_COMPROMISE if compromised
                else _enums.RevocationReasonCode.CESSATION_OF_OPERATION)
        date = None
        if compromised:
            date = _primitives.DateTime(
                int(time.time()), _enums.Tags.COMPROMISE_OCCURRENCE_DATE)
        self.call(_enums.Operation.REVOKE,
                  _payloads.RevokeRequestPayload(
                      unique_identifier=_UID(uid),
                      revocation_reason=_objects.RevocationReason(
                          code=code, message=message),
                      compromise_occurrence_date=date),
                  'key %s' % uid)

    def destroy(self, uid):
        """Destroy the key object ``uid`` (it must not be Active)."""
        self.call(_enums.Operation.DESTROY,
                  _payloads.DestroyRequestPayload(unique_identifier=_UID(uid)),
                  'key %s' % uid)

    def get_key(self, uid):
        """The key material of the symmetric key ``uid`` (Get)."""
        payload = self.call(_enums.Operation.GET,
                            _payloads.GetRequestPayload(unique_identifier=uid),
                            'key %s' % uid)
        try:
            value = payload.secret.key_block.key_value.key_material.value
        except AttributeError:
            raise KmipError('%s: Get of key %s: not a symmetric key'
                            % (self.server, uid), self.server) from None
        return bytes(value)


def _close(conn):
    try:
        conn.close()
    except OSError:   # pragma: no cover
        pass


def _tls_reason(e):
    reason = getattr(e, 'reason', None) or getattr(e, 'strerror', None)
    return str(reason or type(e).__name__)[:100]


def _gcm_params():
    return _CryptoParams(
        block_cipher_mode=_enums.BlockCipherMode.GCM,
        cryptographic_algorithm=_enums.CryptographicAlgorithm.AES,
        tag_length=TAG_SIZE, random_iv=True)


def split_blob(blob, key_id):
    """``(iv, ciphertext, tag)`` of a suite 6 blob; raise
    TruncatedDataError or AuthenticationError for a blob of a wrong
    size."""
    if len(blob) < 1 + MIN_IV_SIZE + wrapped.DEK_SIZE + TAG_SIZE:
        raise TruncatedDataError('wrapped DEK truncated: %d bytes of KMIP '
                                 'AES-GCM for KEK %s' % (len(blob), key_id))
    n = blob[0]
    if (not MIN_IV_SIZE <= n <= MAX_IV_SIZE
            or len(blob) != 1 + n + wrapped.DEK_SIZE + TAG_SIZE):
        raise AuthenticationError('wrapped DEK has a wrong size for KEK %s'
                                  % key_id)
    return blob[1:1 + n], blob[1 + n:-TAG_SIZE], blob[-TAG_SIZE:]


def join_blob(iv, ciphertext, tag):
    """The suite 6 blob ``n || IV || ciphertext || tag``."""
    return bytes([len(iv)]) + iv + ciphertext + tag


# Refused whatever the operation: the key cannot serve at all.
_DEAD_STATES = ('PRE_ACTIVE', 'DESTROYED', 'DESTROYED_COMPROMISED')


@implementer(IKeyEncryptingKey)
class KmipKeyEncryptingKey:
    """A key encrypting key that lives in a KMIP server.

    DEKs are wrapped and unwrapped by the server's Encrypt and Decrypt
    (AES-256-GCM, the wrapped-DEK header as authenticated additional
    data); the key never enters the process.  ``client`` is a
    :class:`KmipClient`, ``uid`` the key object's unique identifier.
    With ``check`` (the default) the key is looked up now: a missing key,
    a key that is not an AES-256 symmetric key, or one that is
    Pre-Active or destroyed raises :class:`~zodbkmi.exceptions.KmipError`
    here, not later.
    A Deactivated or Compromised (revoked) key is accepted: a server may
    still let it decrypt.
    """

    suite = wrapped.SUITE_KMIP_AES_GCM

    def __init__(self, client, uid, check=True):
        self.client = client
        self.uid = uid
        self.key_id = kmip_key_id(uid)
        self.source = '%s key %s' % (client.server, uid)
        if check:
            self.check()

    def __repr__(self):
        return '<%s %s>' % (type(self).__name__, self.key_id)

    def close(self):
        """Close the client's idle connections (a later call reconnects)."""
        self.client.close()

    def check(self):
        """Check that the key object can be a KEK; return its attributes
        (see :meth:`KmipClient.attributes`)."""
        attrs = self.client.attributes(self.uid)
        kind = attrs.get('object_type')
        if kind is not None and kind != _enums.ObjectType.SYMMETRIC_KEY:
            raise KmipError('%s: a %s, not a symmetric key'
                            % (self.source, _enum_name(kind)),
                            self.client.server)
        algorithm, length = attrs.get('algorithm'), attrs.get('length')
        if algorithm != _enums.CryptographicAlgorithm.AES or length != 256:
            raise KmipError('%s: a %s key of %s bits, not AES-256'
                            % (self.source, _enum_name(algorithm),
                               length), self.client.server)
        state = attrs.get('state')
        if getattr(state, 'name', None) in _DEAD_STATES:
            raise KmipError('%s: the key is %s' % (self.source,
                                                   _enum_name(state)),
                            self.client.server)
        return attrs

    def wrap(self, dek, aad):
        payload = self.client.call(
            _enums.Operation.ENCRYPT,
            _payloads.EncryptRequestPayload(
                unique_identifier=self.uid,
                cryptographic_parameters=_gcm_params(), data=dek,
                auth_additional_data=aad),
            'key %s' % self.uid)
        iv, ciphertext, tag = (payload.iv_counter_nonce, payload.data,
                               payload.auth_tag)
        if (not iv or not MIN_IV_SIZE <= len(iv) <= MAX_IV_SIZE
                or not ciphertext or len(ciphertext) != len(dek)
                or not tag or len(tag) != TAG_SIZE):
            raise KmipError('%s: Encrypt answered without a usable IV, '
                            'ciphertext or 128 bit tag (does the server '
                            'speak KMIP 1.4 authenticated encryption?)'
                            % self.source, self.client.server)
        return join_blob(iv, ciphertext, tag)

    def unwrap(self, blob, aad):
        iv, ciphertext, tag = split_blob(blob, self.key_id)
        try:
            payload = self.client.call(
                _enums.Operation.DECRYPT,
                _payloads.DecryptRequestPayload(
                    unique_identifier=self.uid,
                    cryptographic_parameters=_gcm_params(), data=ciphertext,
                    iv_counter_nonce=iv, auth_additional_data=aad,
                    auth_tag=tag),
                'key %s' % self.uid)
        except KmipError as e:
            # A tag that does not verify is a "Cryptographic Failure" in
            # KMIP; PyKMIP answers "General Failure".
            if getattr(e.reason, 'name', None) in ('CRYPTOGRAPHIC_FAILURE',
                                                   'GENERAL_FAILURE'):
                raise AuthenticationError(
                    'wrapped DEK did not authenticate under KEK %s (%s '
                    'refused to decrypt it)' % (self.key_id,
                                                self.client.server)) from None
            raise
        dek = payload.data
        if not dek or len(dek) != wrapped.DEK_SIZE:
            raise KmipError('%s: malformed Decrypt answer' % self.source,
                            self.client.server)
        return bytes(dek)


@implementer(IKeyEncryptingKey)
class KmipFetchedKeyEncryptingKey(KmipKeyEncryptingKey):
    """The weaker mode: the key is fetched with ``Get`` and used in the
    process (as MongoDB does).

    Only with ``"fetchKey": true``.  It saves a round trip per wrap and
    unwrap, but the KEK is then in this process's memory (and in core
    dumps and swap), the server cannot refuse single operations or log
    them, and a revocation takes effect only when the process fetches
    again.  The blobs are the same as the server's: either mode unwraps
    what the other wrapped.
    """

    def __init__(self, client, uid, check=True):
        super().__init__(client, uid, check)
        key = client.get_key(uid)
        if len(key) != 32:
            raise KmipError('%s: Get returned %d bytes, not an AES-256 key'
                            % (self.source, len(key)), client.server)
        self._aead = AESGCM(key)

    @classmethod
    def _from_key(cls, key, uid):
        """A private seam for the fixed test vectors: the KEK of ``key``
        (32 bytes) as if fetched from the key object ``uid``."""
        self = cls.__new__(cls)
        self.client, self.uid = None, uid
        self.key_id = kmip_key_id(uid)
        self.source = 'test vectors key %s' % uid
        self._aead = AESGCM(key)
        return self

    def close(self):
        if self.client is not None:
            self.client.close()

    def wrap(self, dek, aad, _iv=None):
        """``_iv`` is a private seam for the fixed test vectors; never
        pass it in real code."""
        iv = _iv or os.urandom(MIN_IV_SIZE)
        sealed = self._aead.encrypt(iv, dek, aad)
        return join_blob(iv, sealed[:-TAG_SIZE], sealed[-TAG_SIZE:])

    def unwrap(self, blob, aad):
        iv, ciphertext, tag = split_blob(blob, self.key_id)
        try:
            return self._aead.decrypt(iv, ciphertext + tag, aad)
        except InvalidTag:
            raise AuthenticationError(
                'wrapped DEK did not authenticate under KEK %s'
                % self.key_id) from None


def client_from_params(params):
    """The :class:`KmipClient` of ``kmip`` settings."""
    return KmipClient(params['host'], params.get('port', DEFAULT_PORT),
                      params['certFile'], params['keyFile'],
                      params['caFile'], params.get('timeout', 5.0),
                      params.get('poolSize', DEFAULT_POOL_SIZE),
                      params.get('serverName'))


def kmip_kek(params, environ=None):
    """The KMIP KEK of ``kmip`` settings: the key ``uid``, or the one
    object named ``name``."""
    client = client_from_params(params)
    try:
        return _kmip_kek(client, params)
    except BaseException:
        client.close()
        raise


def _kmip_kek(client, params):
    uid = params.get('uid')
    if uid is None:
        uids = client.locate(params['name'])
        if len(uids) != 1:
            raise KmipError('%s: %s objects are named %r (give the uid)'
                            % (client.server, len(uids) or 'no',
                               params['name'][:60]), client.server)
        uid = uids[0]
    cls = (KmipFetchedKeyEncryptingKey if params.get('fetchKey')
           else KmipKeyEncryptingKey)
    return cls(client, uid)


def create_kek(client, name=None):
    """Create an AES-256 KEK in the KMIP server (Create + Activate) and
    return it (a :class:`KmipKeyEncryptingKey`)."""
    return KmipKeyEncryptingKey(client, client.create_key(name))


def rotate_kek(kek, name=None):
    """Create the successor of the KMIP KEK ``kek`` in the same server and
    return it.  ``kek`` stays active: list it under ``previous`` to unwrap
    what it wrapped (or rewrap the DEKs with
    :meth:`~zodbkmi.facility.KeyManagementFacility.rewrap`, then
    revoke it)."""
    return create_kek(kek.client, name)


def revoke_kek(client, uid, compromised=False, message=None):
    """Revoke the key object ``uid``: the server wraps nothing more with it
    (and, depending on the server, unwraps nothing more)."""
    client.revoke(uid, compromised=compromised, message=message)


def destroy_kek(client, uid):
    """Destroy the key object ``uid`` for good: every DEK it wrapped (and so
    all data under them) becomes unreadable.  An Active key is revoked
    first.  For crypto-shredding: call it, then forget the key id."""
    state = client.attributes(uid).get('state')
    if getattr(state, 'name', None) == 'ACTIVE':
        client.revoke(uid)
    client.destroy(uid)
