"""Key rules: which keys each mode needs, from where, and KEK rotation."""
import os

from zodbkmi.exceptions import InvalidKeyError
from zodbkmi.exceptions import UnknownKeyError
from zodbkmi.interfaces import IDataKeyCreation
from zodbkmi.kek import AESKeyEncryptingKey
from zodbkmi.kek import as_kek
from zodbkmi.migrate.kinds import ALGORITHMS
from zodbkmi.migrate.kinds import DECRYPT
from zodbkmi.migrate.kinds import ENCRYPT
from zodbkmi.migrate.kinds import MigrationError
from zodbkmi.migrate.kinds import REKEY
from zodbkmi.migrate.kinds import SCAN
from zodbkmi.sources.local import decode_key


class MigrationKeys:
    """The keys of a migration.

    ``service`` is an encryption service (``encrypt(key, data, oid)``,
    ``decrypt(key, data, oid)``, ``key_id_of``), ``new`` the KEK that
    encrypts (None for decrypt and scan), ``old`` a sequence of KEKs that
    may decrypt besides ``new``.  :attr:`target_dek_id` is the active DEK
    of ``new``: records under it need no rekey.
    """

    def __init__(self, service, new=None, old=()):
        self.service = service
        self.new = new
        self.old = tuple(old)
        self._target = None
        self._decrypt_keys = None
        self.create = True

    @property
    def decrypt_keys(self):
        """The KEK, or the tuple of KEKs, that may decrypt (the same object
        each time, which the facility's per-key lookups need)."""
        keys = ((self.new,) if self.new is not None else ()) + self.old
        keys = keys[0] if len(keys) == 1 else keys
        if keys != self._decrypt_keys:
            self._decrypt_keys = keys
        return self._decrypt_keys

    @property
    def can_decrypt(self):
        return self.new is not None or bool(self.old)

    @property
    def target_dek_id(self):
        """The DEK id (hex) new records are encrypted under."""
        if self._target is None:
            if self.new is None:
                raise MigrationError('no new key given: cannot encrypt')
            creates = IDataKeyCreation.providedBy(self.service)
            if not self.create:
                # dry run: look, do not create
                if not creates:
                    return None
                return self.service.active_key_id(self.new)
            if creates:
                self._target = self.service.ensure_key(self.new)
            else:
                self._target = self.service.key_id_of(
                    self.service.encrypt(self.new, b''))
        return self._target

    def kek_of(self, dek_id):
        """The KEK id that wraps ``dek_id``, or None when unknown."""
        entry = getattr(self.service, 'entry', None)
        if entry is None:
            return None
        try:
            return entry(dek_id).kek_id
        except UnknownKeyError:
            return None


def _env_key(environ, name):
    value = environ.get(name, '').strip()
    if not value:
        return None
    return AESKeyEncryptingKey(decode_key(value, name))


#: Which of OLD_ENCRYPTION_KEY / NEW_ENCRYPTION_KEY each mode needs
#: (True: required, False: refused, None: optional).
ENV_RULES = {
    ENCRYPT: {'old': False, 'new': True},
    REKEY: {'old': True, 'new': True},
    DECRYPT: {'old': True, 'new': False},
    SCAN: {'old': None, 'new': None},
    'rotate-kek': {'old': True, 'new': True},
}


def keys_from_environ(mode, environ=None):
    """Return ``(old, new)`` AES KEKs (or None) from the environment.

    ``ENCRYPTION_ALGORITHM`` is mandatory and must be ``aes256-gcm``;
    ``OLD_ENCRYPTION_KEY`` and ``NEW_ENCRYPTION_KEY`` are base64 of 32 bytes
    or empty.  ``encrypt`` needs only the new key, ``rekey`` and
    ``rotate-kek`` both (and different), ``decrypt`` only the old one,
    ``scan`` either.  Anything else raises :class:`InvalidKeyError` with a
    one-line message.
    """
    environ = os.environ if environ is None else environ
    algorithm = environ.get('ENCRYPTION_ALGORITHM', '').strip()
    if not algorithm:
        raise InvalidKeyError('ENCRYPTION_ALGORITHM is not set (it must be '
                              'one of: %s)' % ', '.join(ALGORITHMS))
    if algorithm.lower() not in ALGORITHMS:
        raise InvalidKeyError('ENCRYPTION_ALGORITHM %r is not supported '
                              '(supported: %s)'
                              % (algorithm, ', '.join(ALGORITHMS)))
    old = _env_key(environ, 'OLD_ENCRYPTION_KEY')
    new = _env_key(environ, 'NEW_ENCRYPTION_KEY')
    rules = ENV_RULES[mode]
    given = (('old', old), ('new', new))
    for name, key in given:
        if rules[name] and key is None:
            raise InvalidKeyError('%s needs %s (%s_ENCRYPTION_KEY is empty)'
                                  % (mode, _needs(mode), name.upper()))
    for name, key in given:
        if rules[name] is False and key is not None:
            raise InvalidKeyError('%s needs %s (%s_ENCRYPTION_KEY must be '
                                  'empty)' % (mode, _needs(mode),
                                              name.upper()))
    if old is not None and new is not None and old.key_id == new.key_id:
        raise InvalidKeyError('OLD_ENCRYPTION_KEY and NEW_ENCRYPTION_KEY '
                              'are the same key')
    return old, new


def _needs(mode):
    rules = ENV_RULES[mode]
    if rules['old'] and rules['new']:
        return 'both OLD_ENCRYPTION_KEY and NEW_ENCRYPTION_KEY'
    if rules['new']:
        return 'NEW_ENCRYPTION_KEY only'
    return 'OLD_ENCRYPTION_KEY only'


def rotate_kek(facility, old, new):
    """Rewrap every DEK of KEK ``old`` under KEK ``new``; return the count.

    Data is not touched.  Each vault entry is replaced atomically, so an
    interruption leaves every DEK readable with one of the two KEKs and
    running it again finishes the job (DEKs already under ``new`` are not
    touched).
    """
    old, new = as_kek(old), as_kek(new)
    return facility.rewrap(old, new)
