"""ZCML directives registering the application's key holder and facility.

Load them with ``<include package="zodbkmi" file="meta.zcml" />``; they
live in the namespace :data:`NAMESPACE` and need the ``zcml`` extra
(``zope.configuration``).  Three directives:

``keyHolder``
    registers the :class:`~zodbkmi.sources.SettingsKeyHolder` of the
    encryption settings in a JSON file (``settings``), or of the
    environment (``$ZODBKMI_ENCRYPTION``, ``$ZODBKMI_ENCRYPTION_FILE``) when
    ``settings`` is not given, as the
    :class:`~zodbkmi.interfaces.IKeyHolder` utility.  Settings that say
    ``"enabled": false`` register nothing.
``keyManagementFacility``
    registers a :class:`~zodbkmi.facility.KeyManagementFacility` (wrapped
    data keys in ``storageDir``);
``localKeyManagementFacility``
    registers a :class:`~zodbkmi.client.LocalKeyManagementFacility` (a
    client of the key server at ``url``, or of the replicas of one key
    service when ``url`` holds several URLs separated by white space or
    commas; ``policy``, ``downTime`` and ``gracePeriod`` as for the
    class).

A facility is one object registered as the
:class:`~zodbkmi.interfaces.IEncryptionService` (the utility that
:class:`~zodbkmi.persistent.EncryptedPersistent` and the migration look
up), :class:`~zodbkmi.interfaces.IKeyGenerationService` and
:class:`~zodbkmi.interfaces.IKeyManagementFacility` utility.  With
``ensureKey="true"`` the facility creates the active data key of the
registered key holder's current key when it has none, once everything is
registered (nothing happens when no key holder is registered: disabled
settings still switch encryption off).

The settings are read and checked while the configuration is parsed; keys
are fetched and facilities made when its actions run.  Registrations use
the discriminators of ``<utility>`` (``('utility', interface, '')``), so
two key holders, two facilities, or one of them and a ``<utility>`` of the
same interface, in one configuration are a conflict.  Every error is a
``ConfigurationError`` naming the directive and the file (its cause is the
zodbkmi error); no directive takes a key or a token, so none can leak
through a configuration error.
"""
import os

import zope.component
from zope.configuration.exceptions import ConfigurationError
from zope.configuration.fields import Bool
from zope.configuration.fields import Path
from zope.interface import Interface
from zope.schema import Choice
from zope.schema import Float
from zope.schema import Int
from zope.schema import TextLine

from zodbkmi.exceptions import ZodbKmiError
from zodbkmi.interfaces import IEncryptionService
from zodbkmi.interfaces import IKeyGenerationService
from zodbkmi.interfaces import IKeyHolder
from zodbkmi.interfaces import IKeyManagementFacility

#: The XML namespace of the directives (a name, not a web page).
NAMESPACE = 'http://namespaces.zodbkmi.org/zodbkmi'

#: The interfaces a facility directive registers its facility as.
FACILITY_INTERFACES = (IEncryptionService, IKeyGenerationService,
                       IKeyManagementFacility)

# ensureKey runs after the registrations of the whole configuration.
_ENSURE_KEY_ORDER = 1000

_ENVIRONMENT = ('the environment ($ZODBKMI_ENCRYPTION, '
                '$ZODBKMI_ENCRYPTION_FILE)')


def _fail(directive, message):
    return ConfigurationError('%s: %s' % (directive, message))


def _register(component, provides, info):
    zope.component.getSiteManager().registerUtility(
        component, provides, '', info)


# -- keyHolder --------------------------------------------------------------

class IKeyHolderDirective(Interface):
    """Register the key holder of encryption settings."""

    settings = Path(
        title='Encryption settings',
        description=('A JSON file of encryption settings (see '
                     'zodbkmi.sources.settings), relative to the ZCML file. '
                     'Without it, the settings come from '
                     '$ZODBKMI_ENCRYPTION (JSON) or from the file named by '
                     '$ZODBKMI_ENCRYPTION_FILE.'),
        required=False)


def keyHolder(_context, settings=None):
    """Handler of ``<keyHolder>``: read and check the settings now, make
    the key holder when the actions run."""
    from zodbkmi.sources import environment_settings
    from zodbkmi.sources import load_settings
    try:
        if settings is None:
            source = _ENVIRONMENT
            parsed = environment_settings()
        else:
            source = 'the encryption settings %s' % settings
            parsed = load_settings(settings)
    except ZodbKmiError as e:
        raise _fail('keyHolder', str(e)) from e
    # Disabled settings register nothing, but still take the key holder's
    # place: a conflict stays a conflict, and an override with disabled
    # settings switches encryption off.
    _context.action(
        discriminator=('utility', IKeyHolder, ''),
        callable=_register_keyholder if parsed.enabled else None,
        args=(parsed, source, _context.info))


def _register_keyholder(settings, source, info):
    from zodbkmi.sources import SettingsKeyHolder
    try:
        holder = SettingsKeyHolder(settings)
    except ZodbKmiError as e:
        raise _fail('keyHolder', 'cannot get the keys of %s: %s'
                    % (source, e)) from e
    _register(holder, IKeyHolder, info)


# -- facilities ---------------------------------------------------------------

class _IFacilityDirective(Interface):

    ensureKey = Bool(
        title='Ensure an active data key',
        description=('Create the active data key of the registered key '
                     "holder's current key when it has none, after all "
                     'registrations (nothing happens when no key holder is '
                     'registered, e.g. disabled settings).'),
        required=False, default=False)

    cacheTimeout = Float(
        title='DEK cache timeout',
        description='Seconds an unwrapped data key stays cached.',
        required=False, min=0.0)

    cacheSize = Int(
        title='DEK cache size',
        description='How many unwrapped data keys are cached at most.',
        required=False, min=1)


class IKeyManagementFacilityDirective(_IFacilityDirective):
    """Register a master key management facility (a key directory)."""

    storageDir = Path(
        title='Key directory',
        description=('The directory of the wrapped data keys, relative to '
                     'the ZCML file (created with mode 0700 if missing; '
                     'refused if group or others can write it).'),
        required=True)


class ILocalKeyManagementFacilityDirective(_IFacilityDirective):
    """Register a client of a key server."""

    url = TextLine(
        title='Key server URL',
        description=('https://host:port of the key server; several '
                     'replicas of one key service: their URLs separated '
                     'by white space or commas.'),
        required=True)

    policy = Choice(
        title='Replica policy',
        description=('With several URLs: "prefer" (the first healthy '
                     'one, the default) or "spread" (round-robin among '
                     'the healthy ones).'),
        values=('prefer', 'spread'), required=False)

    downTime = Float(
        title='Down time',
        description=('Seconds a replica that failed is left alone '
                     '(default 30).'),
        required=False, min=0.0)

    gracePeriod = Float(
        title='Grace period',
        description=('Seconds a cached data key may serve past its time '
                     'to live while no key server answers (default 0: '
                     'never; at most 86400).'),
        required=False, min=0.0, max=86400.0)

    caFile = Path(
        title='CA certificate',
        description=('The CA that signed the server certificate (PEM); '
                     'the system store when not given.'),
        required=False)

    tokenFile = Path(
        title='Token file',
        description=('A file holding the bearer token, mode 0600: '
                     'refused when group or others have any access (give '
                     'tokenFile or tokenEnv).'),
        required=False)

    tokenEnv = TextLine(
        title='Token variable',
        description='An environment variable holding the bearer token.',
        required=False)

    clientCert = Path(
        title='Client certificate',
        description='A client certificate (PEM) for mutual TLS.',
        required=False)

    clientKey = Path(
        title='Client key',
        description='The private key of clientCert, if not in that file.',
        required=False)

    requestTimeout = Float(
        title='Request timeout',
        description='Seconds each request attempt may take (default 5).',
        required=False, min=0.001)

    allowHttp = Bool(
        title='Allow plain HTTP',
        description=('Accept an http:// URL (development only: tokens '
                     'and wrapped keys then cross the network in clear).'),
        required=False, default=False)


class _Facility:
    """Makes the facility of a directive once, when the first of its
    actions runs, and gives the same object to the others."""

    def __init__(self, directive, make, **kw):
        self.directive = directive
        self._make = make
        self._kw = kw
        self._facility = None

    def __call__(self):
        if self._facility is None:
            self._facility = self._make(self.directive, **self._kw)
        return self._facility


def _facility_actions(_context, factory, ensureKey):
    for provides in FACILITY_INTERFACES:
        _context.action(
            discriminator=('utility', provides, ''),
            callable=_register_facility,
            args=(factory, provides, _context.info))
    if ensureKey:
        _context.action(
            discriminator=None, callable=_ensure_key, args=(factory,),
            order=_ENSURE_KEY_ORDER)


def _register_facility(factory, provides, info):
    _register(factory(), provides, info)


def _ensure_key(factory):
    holder = zope.component.queryUtility(IKeyHolder)
    if holder is None:
        return
    try:
        factory().ensure_key(holder.key)
    except ZodbKmiError as e:
        raise _fail(factory.directive, 'ensureKey: cannot create the '
                    'active data key of %s: %s'
                    % (getattr(holder.key, 'key_id', 'the key'), e)) from e


def _cache_options(cacheTimeout, cacheSize):
    kw = {}
    if cacheTimeout is not None:
        kw['timeout'] = cacheTimeout
    if cacheSize is not None:
        kw['cache_size'] = cacheSize
    return kw


def keyManagementFacility(_context, storageDir, ensureKey=False,
                          cacheTimeout=None, cacheSize=None):
    """Handler of ``<keyManagementFacility>``."""
    factory = _Facility('keyManagementFacility', _make_master,
                        storage_dir=storageDir,
                        **_cache_options(cacheTimeout, cacheSize))
    _facility_actions(_context, factory, ensureKey)


def _make_master(directive, storage_dir, **kw):
    from zodbkmi.facility import KeyManagementFacility
    try:
        return KeyManagementFacility(storage_dir, **kw)
    except ZodbKmiError as e:
        raise _fail(directive, str(e)) from e


def localKeyManagementFacility(_context, url, caFile=None, tokenFile=None,
                               tokenEnv=None, clientCert=None,
                               clientKey=None, requestTimeout=None,
                               allowHttp=False, ensureKey=False,
                               cacheTimeout=None, cacheSize=None,
                               policy=None, downTime=None, gracePeriod=None):
    """Handler of ``<localKeyManagementFacility>``."""
    from urllib.parse import urlsplit
    from zodbkmi.client import split_urls
    directive = 'localKeyManagementFacility'
    try:
        urls = split_urls(url)
    except ValueError as e:
        raise _fail(directive, 'url: %s' % e) from None
    for url in urls:
        try:
            parts = urlsplit(url)
            parts.port
        except ValueError:
            raise _fail(directive, 'url %r is not a URL' % url) from None
        if parts.scheme == 'http':
            if not allowHttp:
                raise _fail(directive, 'url %s: plain http is refused '
                            '(tokens and keys would cross the network in '
                            'clear); use https, or set allowHttp for '
                            'development' % url)
        elif parts.scheme != 'https':
            raise _fail(directive, 'url %r must start with https://' % url)
        if not parts.hostname:
            raise _fail(directive, 'url %r has no host' % url)
    url = ' '.join(urls)
    if (tokenFile is None) == (tokenEnv is None):
        raise _fail(directive, 'give exactly one of tokenFile and tokenEnv')
    if clientKey is not None and clientCert is None:
        raise _fail(directive, 'clientKey needs clientCert')
    kw = _cache_options(cacheTimeout, cacheSize)
    if requestTimeout is not None:
        kw['request_timeout'] = requestTimeout
    for name, value in (('policy', policy), ('down_time', downTime),
                        ('grace', gracePeriod)):
        if value is not None:
            kw[name] = value
    factory = _Facility(directive, _make_local, url=url, ca_file=caFile,
                        token_file=tokenFile, token_env=tokenEnv,
                        client_cert=clientCert, client_key=clientKey,
                        allow_http=bool(allowHttp), **kw)
    _facility_actions(_context, factory, ensureKey)


def _make_local(directive, url, ca_file, token_file, token_env, client_cert,
                client_key, allow_http=False, **kw):
    from zodbkmi.client import LocalKeyManagementFacility
    from zodbkmi.fileutil import read_secret_text
    where = '%s (%s)' % (directive, url)
    try:
        if token_file is not None:
            token = read_secret_text(token_file, 'token')
        else:
            token = os.environ.get(token_env, '').strip()
            if not token:
                raise _fail(where, 'tokenEnv: variable %s is not set or '
                            'empty' % token_env)
    except ZodbKmiError as e:
        raise _fail(where, 'tokenFile: %s' % e) from e
    if not token:
        raise _fail(where, 'tokenFile: %s is empty' % token_file)
    for name, path in (('caFile', ca_file), ('clientCert', client_cert),
                       ('clientKey', client_key)):
        if path is not None:
            try:
                with open(path, 'rb'):
                    pass
            except OSError as e:
                raise _fail(where, '%s: cannot read %s: %s'
                            % (name, path, e.strerror)) from None
    try:
        return LocalKeyManagementFacility(
            url, token=token, ca_file=ca_file, client_cert=client_cert,
            client_key=client_key, allow_http=allow_http, **kw)
    except (OSError, ValueError) as e:
        # ssl.SSLError (an OSError): a file that is not PEM, a key that
        # does not match its certificate.  Its text names no key material.
        raise _fail(where, 'cannot set up TLS with caFile %s, clientCert '
                    '%s: %s' % (ca_file, client_cert, e)) from e
