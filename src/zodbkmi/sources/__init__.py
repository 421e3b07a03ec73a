"""Key sources and external KMS/HSM: where the key encrypting keys come from.

:func:`kek_from_params` turns one key source's settings into an
:class:`~zodbkmi.interfaces.IKeyEncryptingKey`; :class:`SettingsKeyHolder`
turns whole encryption settings (current key + previous keys) into the
application's :class:`~zodbkmi.interfaces.IKeyHolder`, and
:func:`register_keyholder` registers it as a utility (the ``keyHolder``
ZCML directive of :mod:`zodbkmi.zcml` too).
"""
import zope.component
from zope.interface import implementer

from zodbkmi.exceptions import SettingsError
from zodbkmi.interfaces import IKeyHolder
from zodbkmi.sources.local import MasterKey
from zodbkmi.sources.local import env_key
from zodbkmi.sources.local import file_key
from zodbkmi.sources.local import key_check_value
from zodbkmi.sources.local import raw_key
from zodbkmi.sources.settings import ENVIRON_NAME
from zodbkmi.sources.settings import EncryptionSettings
from zodbkmi.sources.settings import load_settings
from zodbkmi.sources.settings import parse_params
from zodbkmi.sources.settings import parse_settings
from zodbkmi.sources.settings import settings_from_environ

__all__ = ['EncryptionSettings', 'EnvironmentKeyHolder', 'MasterKey',
           'SettingsKeyHolder', 'environment_settings', 'kek_from_params',
           'keks_from_settings', 'key_check_value', 'load_settings',
           'parse_settings', 'register_keyholder', 'settings_from_environ']


def kek_from_params(params, algorithm='aes256-gcm', environ=None):
    """Return the key encrypting key that the key source ``params`` (a
    dict, see :mod:`zodbkmi.sources.settings`) names.

    Raises :class:`~zodbkmi.exceptions.SettingsError`,
    :class:`~zodbkmi.exceptions.InvalidKeyError` (bad base64, wrong length,
    key check value mismatch) and
    :class:`~zodbkmi.exceptions.KeySourceError` (the source cannot deliver).
    """
    params = parse_params(params)
    source = params['source']
    if source == 'raw':
        return raw_key(params, algorithm)
    if source == 'file':
        return file_key(params, algorithm)
    if source == 'env':
        return env_key(params, algorithm, environ)
    if source == 'vaultKV':
        from zodbkmi.sources.vault import kv_key
        return kv_key(params, algorithm, environ)
    if source == 'vaultTransit':
        from zodbkmi.sources.vault import transit_kek
        return transit_kek(params, environ)
    if source == 'kmip':
        from zodbkmi.sources.kmip import kmip_kek
        return kmip_kek(params, environ)
    from zodbkmi.sources.pkcs11 import pkcs11_kek
    return pkcs11_kek(params, environ)


def keks_from_settings(settings, environ=None):
    """Return ``(current, previous)`` KEKs of ``settings`` (see
    :func:`~zodbkmi.sources.settings.parse_settings`)."""
    settings = parse_settings(settings)
    if not settings.enabled:
        raise SettingsError('encryption settings: enabled: encryption is '
                            'disabled, there is no key')
    current = kek_from_params(settings.params, settings.algorithm, environ)
    previous = tuple(kek_from_params(p, settings.algorithm, environ)
                     for p in settings.previous)
    ids = [current.key_id] + [k.key_id for k in previous]
    if len(set(ids)) != len(ids):
        raise SettingsError('encryption settings: previous: a previous key '
                            'is the current key or listed twice (%s)'
                            % ', '.join(ids))
    return current, previous


@implementer(IKeyHolder)
class SettingsKeyHolder:
    """The key holder described by encryption settings.

    ``key`` is the current KEK (it wraps new data keys), ``previous_keys``
    the older ones (decrypt-only).  Pass ``keys`` to a facility's
    ``decrypt`` to read data under any of them.
    """

    def __init__(self, settings, environ=None):
        self.settings = parse_settings(settings)
        self.key, self.previous_keys = keks_from_settings(self.settings,
                                                          environ)

    @property
    def keys(self):
        """The current KEK followed by the previous ones (a tuple)."""
        return (self.key,) + self.previous_keys

    def __repr__(self):
        return '<%s %s (+%d previous)>' % (
            type(self).__name__, self.key.key_id, len(self.previous_keys))


class EnvironmentKeyHolder(SettingsKeyHolder):
    """The key holder of the settings in ``$ZODBKMI_ENCRYPTION`` (JSON), or
    in the JSON file named by ``$ZODBKMI_ENCRYPTION_FILE``.

    A factory without arguments, for ZCML::

        <utility factory="zodbkmi.sources.EnvironmentKeyHolder"
                 provides="zodbkmi.interfaces.IKeyHolder" />

    (``<kmi:keyHolder />`` of :mod:`zodbkmi.zcml` does the same, and
    registers nothing for disabled settings.)
    """

    def __init__(self, environ=None):
        super().__init__(environment_settings(environ), environ)


def environment_settings(environ=None):
    """Return the settings in ``$ZODBKMI_ENCRYPTION`` (JSON), or else in the
    JSON file named by ``$ZODBKMI_ENCRYPTION_FILE``.

    Raises :class:`~zodbkmi.exceptions.SettingsError` when neither is set
    or the settings are not valid.
    """
    import os
    environ = os.environ if environ is None else environ
    settings = settings_from_environ(ENVIRON_NAME, environ)
    if settings is None:
        path = environ.get(ENVIRON_NAME + '_FILE')
        if not path:
            raise SettingsError(
                'encryption settings: neither $%s nor $%s_FILE is set'
                % (ENVIRON_NAME, ENVIRON_NAME))
        settings = load_settings(path)
    return settings


def register_keyholder(settings, environ=None):
    """Register the key holder of ``settings`` as the
    :class:`~zodbkmi.interfaces.IKeyHolder` utility and return it; when
    the settings say ``"enabled": false``, register nothing and return
    None."""
    settings = parse_settings(settings)
    if not settings.enabled:
        return None
    holder = SettingsKeyHolder(settings, environ)
    zope.component.provideUtility(holder, IKeyHolder)
    return holder
