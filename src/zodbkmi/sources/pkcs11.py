"""PKCS#11: a key encrypting key inside an HSM token (wrapping suite 4).

Needs the ``pkcs11`` extra (python-pkcs11).  An AES-256 secret key object,
found by its label in a token found by its label, wraps each DEK with
CKM_AES_GCM *inside the token*: a fresh 12 byte nonce, the wrapped-DEK
header as associated data, a 128 bit tag.  The blob is ``nonce (12) ||
ciphertext (32) || tag (16)``.  The key never leaves the token (create it
with :func:`create_key`: non-extractable and sensitive).

PKCS#11 keys have no versions: rotate by creating a key under a new label
(``kek-2``); the label is part of the key id
(``pkcs11:<token label>:<key label>``).
"""
import hashlib
import os
import re
import threading

from zope.interface import implementer

from zodbkmi.exceptions import AuthenticationError
from zodbkmi.exceptions import KeySourceError
from zodbkmi.fileutil import read_secret_text
from zodbkmi.format import wrapped
from zodbkmi.interfaces import IKeyEncryptingKey

try:
    import pkcs11 as _p11
    from pkcs11 import exceptions as _p11e
    from pkcs11.mechanisms import GCMParams as _GCMParams
except ImportError:   # pragma: no cover
    _p11 = None

NONCE_SIZE = 12
TAG_BITS = 128
BLOB_SIZE = NONCE_SIZE + wrapped.DEK_SIZE + TAG_BITS // 8

_LABEL = re.compile(r'[A-Za-z0-9._+=-]{1,64}\Z')
_open_lock = threading.Lock()
_logins = {}   # (library, token label) -> SHA-256 of the PIN that logged in


def _require():
    if _p11 is None:   # pragma: no cover
        raise KeySourceError('PKCS#11 sources need python-pkcs11 >= 0.9: '
                             'install zodbkmi[pkcs11]')


def read_pin(params, environ=None):
    """The user PIN from ``pinFile`` or ``pinEnv``."""
    environ = os.environ if environ is None else environ
    if params.get('pinFile'):
        return read_secret_text(params['pinFile'], 'PIN', 'utf-8')
    name = params.get('pinEnv')
    if name and environ.get(name):
        return environ[name].strip()
    raise KeySourceError('PKCS#11 PIN variable %s is not set' % name, name)


def _load(library, where):
    _require()
    if not os.path.isfile(library):
        raise KeySourceError('%s: no PKCS#11 library %s' % (where, library),
                             library)
    try:
        return _p11.lib(library)
    except Exception as e:   # the binding raises several kinds
        raise KeySourceError('%s: cannot load PKCS#11 library %s (%s)'
                             % (where, library, type(e).__name__),
                             library) from None


def _session(library, token_label, pin, rw=False):
    where = 'pkcs11 token %s' % token_label
    lib = _load(library, where)
    try:
        token = lib.get_token(token_label=token_label)
    except _p11e.NoSuchToken:
        raise KeySourceError('%s: no such token in %s'
                             % (where, library), token_label) from None
    except _p11e.MultipleTokensReturned:
        raise KeySourceError('%s: several tokens have this label' % where,
                             token_label) from None
    except _p11e.PKCS11Error as e:
        raise KeySourceError('%s: %s' % (where, type(e).__name__),
                             token_label) from None
    login = (library, token_label)
    digest = hashlib.sha256(pin.encode('utf-8')).digest()
    try:
        try:
            session = token.open(user_pin=pin, rw=rw)
        except _p11e.UserAlreadyLoggedIn:
            # PKCS#11 logins belong to the application, not the session:
            # another session of this process is logged in already.
            known = _logins.get(login)
            if known is not None and known != digest:
                raise _p11e.PinIncorrect() from None
            session = token.open(rw=rw)
    except (_p11e.PinIncorrect, _p11e.PinLenRange, _p11e.PinInvalid):
        raise KeySourceError('%s: login failed: wrong PIN' % where,
                             token_label) from None
    except _p11e.PinLocked:
        raise KeySourceError('%s: login failed: the PIN is locked' % where,
                             token_label) from None
    except _p11e.PKCS11Error as e:
        raise KeySourceError('%s: cannot open a session (%s)'
                             % (where, type(e).__name__),
                             token_label) from None
    _logins[login] = digest
    return session


def create_key(library, token_label, key_label, pin):
    """Generate a non-extractable AES-256 key ``key_label`` in the token
    (for encryption and decryption only); refuse an existing label."""
    with _open_lock:
        session = _session(library, token_label, pin, rw=True)
    try:
        A = _p11.Attribute
        try:
            session.get_key(label=key_label,
                            object_class=_p11.ObjectClass.SECRET_KEY)
        except _p11e.NoSuchKey:
            pass
        except _p11e.MultipleObjectsReturned:
            raise KeySourceError('pkcs11 key %s/%s exists already'
                                 % (token_label, key_label), token_label)
        else:
            raise KeySourceError('pkcs11 key %s/%s exists already'
                                 % (token_label, key_label), token_label)
        session.generate_key(
            _p11.KeyType.AES, 256, label=key_label, store=True,
            template={A.EXTRACTABLE: False, A.SENSITIVE: True,
                      A.ENCRYPT: True, A.DECRYPT: True, A.WRAP: False,
                      A.UNWRAP: False, A.PRIVATE: True})
    finally:
        session.close()


@implementer(IKeyEncryptingKey)
class PKCS11KeyEncryptingKey:
    """An AES-256 key in a PKCS#11 token, wrapping DEKs with AES-GCM.

    ``library`` is the PKCS#11 module (``/usr/lib/softhsm/libsofthsm2.so``),
    ``token_label`` and ``key_label`` find the token and the key, ``pin``
    is the user PIN.  One session is opened and kept (call :meth:`close`);
    operations on it are serialised.
    """

    suite = wrapped.SUITE_PKCS11_AES_GCM

    def __init__(self, library, token_label, key_label, pin):
        self.library = library
        self.token_label = token_label
        self.key_label = key_label
        self.key_id = 'pkcs11:%s:%s' % (token_label, key_label)
        if not _LABEL.match(token_label) or not _LABEL.match(key_label):
            raise KeySourceError(
                'pkcs11 labels %r/%r: use letters, digits and "._+=-" (the '
                'labels go into the key id)' % (token_label[:40],
                                                key_label[:40]),
                token_label)
        self.source = 'pkcs11 %s key %s' % (token_label, key_label)
        self._lock = threading.Lock()
        with _open_lock:
            self._session = _session(library, token_label, pin)
        try:
            self._key = self._session.get_key(
                label=key_label, key_type=_p11.KeyType.AES,
                object_class=_p11.ObjectClass.SECRET_KEY)
        except _p11e.NoSuchKey:
            self.close()
            raise KeySourceError('%s: no such AES key in the token'
                                 % self.source, token_label) from None
        except _p11e.MultipleObjectsReturned:
            self.close()
            raise KeySourceError('%s: several keys have this label'
                                 % self.source, token_label) from None

    def __repr__(self):
        return '<%s %s>' % (type(self).__name__, self.key_id)

    def close(self):
        """Close the PKCS#11 session: the key wraps and unwraps no more."""
        session, self._session = self._session, None
        if session is not None:
            try:
                session.close()
            except Exception:   # pragma: no cover (already closed)
                pass

    def _params(self, nonce, aad):
        return _GCMParams(nonce, aad, TAG_BITS)

    def wrap(self, dek, aad):
        nonce = os.urandom(NONCE_SIZE)
        with self._lock:
            if self._session is None:
                raise KeySourceError('%s: session closed' % self.source)
            try:
                ct = self._key.encrypt(dek, mechanism=_p11.Mechanism.AES_GCM,
                                       mechanism_param=self._params(nonce,
                                                                    aad))
            except _p11e.PKCS11Error as e:
                raise KeySourceError('%s: wrapping failed (%s)' % (
                    self.source, type(e).__name__), self.token_label) \
                    from None
        return nonce + bytes(ct)

    def unwrap(self, blob, aad):
        if len(blob) != BLOB_SIZE:
            raise AuthenticationError('wrapped DEK has a wrong size for KEK '
                                      '%s' % self.key_id)
        with self._lock:
            if self._session is None:
                raise KeySourceError('%s: session closed' % self.source)
            try:
                dek = self._key.decrypt(
                    blob[NONCE_SIZE:], mechanism=_p11.Mechanism.AES_GCM,
                    mechanism_param=self._params(blob[:NONCE_SIZE], aad))
            except (_p11e.EncryptedDataInvalid, _p11e.EncryptedDataLenRange,
                    _p11e.FunctionFailed, _p11e.GeneralError):
                raise AuthenticationError(
                    'wrapped DEK did not authenticate under KEK %s'
                    % self.key_id) from None
            except _p11e.PKCS11Error as e:
                raise KeySourceError('%s: unwrapping failed (%s)' % (
                    self.source, type(e).__name__), self.token_label) \
                    from None
        return bytes(dek)


def pkcs11_kek(params, environ=None):
    """The :class:`PKCS11KeyEncryptingKey` of ``pkcs11`` settings."""
    return PKCS11KeyEncryptingKey(params['library'], params['tokenLabel'],
                                  params['keyLabel'],
                                  read_pin(params, environ))
