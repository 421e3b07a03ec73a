"""Encryption settings: one structure for Python, a JSON file, the environment.

The shape is the one users of database encryption know::

    {"enabled": true,
     "algorithm": "aes256-gcm",
     "params": {"source": "file", "path": "/etc/zodbkmi/master.key"},
     "previous": [{"source": "raw", "key": "..."}]}

``params`` names the current key encrypting key (it wraps new data keys);
``previous`` lists older ones, kept to unwrap what they wrapped (like
``MasterKey`` and ``PreviousMasterKeys``).  Every setting is checked by
:func:`parse_settings`; an error is one line naming the setting (never its
value when the value may be secret) and raises
:class:`~zodbkmi.exceptions.SettingsError`.
"""
import json
import os
import re

from zodbkmi.exceptions import SettingsError

#: The only algorithm: AES-256-GCM key encrypting keys.
ALGORITHMS = ('aes256-gcm',)

#: The environment variable read by :func:`settings_from_environ`.
ENVIRON_NAME = 'ZODBKMI_ENCRYPTION'

DEFAULT_TIMEOUT = 5.0

# What a KEK id may hold: it travels in the key server's URL paths.
_KEY_ID = re.compile(r'[A-Za-z0-9._:+=-]{1,255}\Z')

_str = (str,)
_num = (int, float)

_VAULT_COMMON = {
    'url': (_str, True),
    'token': (_str, False),
    'tokenFile': (_str, False),
    'tokenEnv': (_str, False),
    'caFile': (_str, False),
    'timeout': (_num, False),
    'allowHttp': ((bool,), False),
}

#: source name -> {parameter: (types, required)}; ``source`` is implied.
SOURCES = {
    'raw': {'key': (_str, True), 'keyId': (_str, False),
            'checkValue': (_str, False)},
    'file': {'path': (_str, True), 'keyId': (_str, False),
             'checkValue': (_str, False)},
    'env': {'variable': (_str, True), 'keyId': (_str, False),
            'checkValue': (_str, False)},
    'vaultKV': dict(_VAULT_COMMON, mount=(_str, False), path=(_str, True),
                    version=((int,), False), checkValue=(_str, False)),
    'vaultTransit': dict(_VAULT_COMMON, mount=(_str, False),
                         keyName=(_str, True)),
    'pkcs11': {'library': (_str, True), 'tokenLabel': (_str, True),
               'keyLabel': (_str, True), 'pinFile': (_str, False),
               'pinEnv': (_str, False)},
    'kmip': {'host': (_str, True), 'port': ((int,), False),
             'certFile': (_str, True), 'keyFile': (_str, True),
             'caFile': (_str, True), 'uid': (_str, False),
             'name': (_str, False), 'serverName': (_str, False),
             'timeout': (_num, False), 'poolSize': ((int,), False),
             'fetchKey': ((bool,), False)},
}

_DEFAULTS = {
    'vaultKV': {'mount': 'secret', 'timeout': DEFAULT_TIMEOUT,
                'allowHttp': False},
    'vaultTransit': {'mount': 'transit', 'timeout': DEFAULT_TIMEOUT,
                     'allowHttp': False},
    'kmip': {'port': 5696, 'timeout': DEFAULT_TIMEOUT, 'poolSize': 4,
             'fetchKey': False},
}

_ONE_OF = {
    'vaultKV': ('token', 'tokenFile', 'tokenEnv'),
    'vaultTransit': ('token', 'tokenFile', 'tokenEnv'),
    'pkcs11': ('pinFile', 'pinEnv'),
    'kmip': ('uid', 'name'),
}

_TOP = ('enabled', 'algorithm', 'params', 'previous')


def _fail(where, message):
    raise SettingsError('encryption settings: %s: %s' % (where, message))


def _type_names(types):
    names = {str: 'a string', int: 'an integer', float: 'a number',
             bool: 'true or false'}
    return ' or '.join(names[t] for t in types if t in names)


def parse_params(params, where='params'):
    """Validate one key source's parameters; return a new dict with the
    defaults filled in."""
    if not isinstance(params, dict):
        _fail(where, 'must be an object, not %s' % type(params).__name__)
    source = params.get('source')
    if source not in SOURCES:
        if source is None:
            _fail(where + '.source', 'missing (one of %s)'
                  % ', '.join(SOURCES))
        _fail(where + '.source', 'unknown key source %r (known: %s)'
              % (str(source)[:40], ', '.join(SOURCES)))
    table = SOURCES[source]
    result = {'source': source}
    result.update(_DEFAULTS.get(source, {}))
    for name, value in params.items():
        if name == 'source':
            continue
        if name not in table:
            _fail('%s.%s' % (where, name[:40]),
                  'unknown setting for source %s (known: %s)'
                  % (source, ', '.join(sorted(table))))
        types = table[name][0]
        if (not isinstance(value, types)
                or (bool not in types and isinstance(value, bool))):
            _fail('%s.%s' % (where, name),
                  'must be %s, not %s' % (_type_names(types),
                                          type(value).__name__))
        if isinstance(value, str) and not value:
            _fail('%s.%s' % (where, name), 'must not be empty')
        result[name] = value
    for name, (_, required) in sorted(table.items()):
        if required and name not in result:
            _fail('%s.%s' % (where, name),
                  'missing (required for source %s)' % source)
    one_of = _ONE_OF.get(source)
    if one_of is not None:
        given = [n for n in one_of if n in result]
        if len(given) != 1:
            _fail(where, 'source %s needs exactly one of %s (%s given)'
                  % (source, ', '.join(one_of),
                     ', '.join(given) if given else 'none'))
    if 'timeout' in result and not 0 < result['timeout'] <= 300:
        _fail(where + '.timeout', 'must be between 0 and 300 seconds')
    if 'keyId' in result and not _KEY_ID.match(result['keyId']):
        _fail(where + '.keyId', 'use 1 to 255 letters, digits and "._:+=-"')
    if 'port' in result and not 0 < result['port'] < 65536:
        _fail(where + '.port', 'must be between 1 and 65535')
    if 'poolSize' in result and not 0 < result['poolSize'] <= 64:
        _fail(where + '.poolSize', 'must be between 1 and 64')
    if 'version' in result and result['version'] < 1:
        _fail(where + '.version', 'must be 1 or more')
    if 'url' in result:
        url = result['url']
        if url.startswith('http://'):
            if not result.get('allowHttp'):
                _fail(where + '.url', 'plain http is refused (tokens and '
                      'keys would cross the network in clear); use https, '
                      'or set allowHttp for development')
        elif not url.startswith('https://'):
            _fail(where + '.url', 'must start with https://')
    return result


class EncryptionSettings:
    """Validated encryption settings.

    ``enabled`` (bool), ``algorithm`` (``'aes256-gcm'``), ``params`` (the
    current key source, a dict) and ``previous`` (a tuple of dicts).
    """

    def __init__(self, enabled, algorithm, params, previous=()):
        self.enabled = enabled
        self.algorithm = algorithm
        self.params = params
        self.previous = tuple(previous)

    def __repr__(self):
        # Sources only: parameters may hold secrets (a raw key, a token).
        if not self.enabled:
            return '<EncryptionSettings disabled>'
        return '<EncryptionSettings %s %s, %d previous>' % (
            self.algorithm, self.params['source'], len(self.previous))


def parse_settings(settings):
    """Return :class:`EncryptionSettings` for ``settings``: a dict (as
    above), a JSON string, or EncryptionSettings (returned as is).

    Raises :class:`~zodbkmi.exceptions.SettingsError`.
    """
    if isinstance(settings, EncryptionSettings):
        return settings
    if isinstance(settings, (str, bytes)):
        try:
            settings = json.loads(settings)
        except json.JSONDecodeError as e:
            _fail('JSON', 'cannot be parsed (line %d, column %d)'
                  % (e.lineno, e.colno))
        except ValueError:   # bytes that are not UTF-8
            _fail('JSON', 'cannot be parsed')
    if not isinstance(settings, dict):
        _fail('settings', 'must be an object, not %s'
              % type(settings).__name__)
    for name in settings:
        if name not in _TOP:
            _fail(str(name)[:40], 'unknown setting (known: %s)'
                  % ', '.join(_TOP))
    enabled = settings.get('enabled', True)
    if not isinstance(enabled, bool):
        _fail('enabled', 'must be true or false')
    algorithm = settings.get('algorithm', ALGORITHMS[0])
    if algorithm not in ALGORITHMS:
        _fail('algorithm', 'unsupported algorithm %r (supported: %s)'
              % (str(algorithm)[:40], ', '.join(ALGORITHMS)))
    if not enabled:
        return EncryptionSettings(False, algorithm, None)
    if 'params' not in settings:
        _fail('params', 'missing (the key source)')
    params = parse_params(settings['params'])
    previous = settings.get('previous', [])
    if not isinstance(previous, list):
        _fail('previous', 'must be a list, not %s' % type(previous).__name__)
    previous = [parse_params(p, 'previous[%d]' % i)
                for i, p in enumerate(previous)]
    return EncryptionSettings(True, algorithm, params, previous)


def load_settings(path):
    """Read and validate the settings in the JSON file ``path``."""
    try:
        with open(path, 'rb') as f:
            data = f.read(1 << 20)
    except OSError as e:
        raise SettingsError('encryption settings: cannot read %s: %s'
                            % (path, e.strerror)) from None
    try:
        return parse_settings(data.decode('utf-8'))
    except UnicodeDecodeError:
        raise SettingsError('encryption settings: %s is not UTF-8'
                            % path) from None
    except SettingsError as e:
        raise SettingsError('%s (in %s)' % (e, path)) from None


def settings_from_environ(name=ENVIRON_NAME, environ=None):
    """Read and validate the settings in the environment variable ``name``
    (JSON).  Return None when it is not set."""
    environ = os.environ if environ is None else environ
    value = environ.get(name)
    if value is None:
        return None
    try:
        return parse_settings(value)
    except SettingsError as e:
        raise SettingsError('%s (in $%s)' % (e, name)) from None
