"""Tenants: a key per tenant, the tenant registry and crypto-shredding.

A *tenant* (a site, a customer, a patient) is the subtree of the object
graph below an object whose class implements
:class:`~zodbkmi.interfaces.ITenant`.  Its
:class:`~zodbkmi.persistent.EncryptedPersistent` objects are sealed under
data keys (DEKs) of the tenant's own key encrypting key (KEK), so
destroying that tenant's keys makes every copy of its data unreadable at
once: current records, FileStorage history, backups (``docs/tenants.rst``).

The :class:`TenantRegistry` is a directory, mode 0700, that maps tenant ids
to their keys::

    tenants.json          {"format": "zodbkmi-tenants", "version": 1,
                           "tenants": {id: record}}  (atomic writes, 0600)
    keys/<id>.key         the KEK of a tenant of kind "file" (0600)
    receipt-signing.key   the Ed25519 key that signs destruction receipts
    receipt-signing.pub   its public half, for auditors
    audit.log             one JSON line per destruction receipt (0600)
    shred-<id>.json       the journal of a shred under way

A tenant's key is one of three *kinds*:

``file``
    an AES-256 KEK of its own in ``keys/<id>.key``; a shred removes it.
``source``
    a KEK of its own from a key source (:mod:`zodbkmi.sources`): a Vault or
    OpenBao Transit key, a PKCS#11 key, a KV secret, a key file elsewhere.
    It is created with the tenant; a shred destroys it where the source
    allows (Transit key deletion, PKCS#11 object destruction, KV metadata
    deletion, file removal).
``shared``
    DEKs of its own under a KEK shared by several tenants (the default key
    holder's): a :class:`TenantScopedKEK` gives the tenant a KEK id of its
    own, so it has an active DEK of its own; a shred destroys the DEKs and
    leaves the shared KEK alone.
"""
import base64
import datetime
import getpass
import hashlib
import json
import os
import re
import socket
import threading

import zope.component
import zope.interface
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey, Ed25519PublicKey)
from zope.interface import implementer

from zodbkmi.exceptions import KeyServerError
from zodbkmi.exceptions import KeySourceError
from zodbkmi.exceptions import KeyStoreError
from zodbkmi.exceptions import TenantError
from zodbkmi.exceptions import UnknownKeyError
from zodbkmi.fileutil import read_secret_file
from zodbkmi.fileutil import write_atomic
from zodbkmi.interfaces import IKeyEncryptingKey
from zodbkmi.interfaces import IKeyHolder
from zodbkmi.kek import AESKeyEncryptingKey
from zodbkmi.kek import as_kek
from zodbkmi.persistent import TENANT_PREFIX

__all__ = ['ITenantDirectory', 'TenantKeyHolder', 'TenantRegistry',
           'TenantScopedKEK', 'register_tenants', 'shred', 'verify_receipt',
           'scan_by_tenant']

FORMAT = 'zodbkmi-tenants'
VERSION = 1
RECEIPT_FORMAT = 'zodbkmi-shred-receipt'
RECEIPT_VERSION = 1
KINDS = ('file', 'source', 'shared')
ACTIVE, SHREDDING, SHREDDED = 'active', 'shredding', 'shredded'
_TENANT_ID = re.compile(r'[A-Za-z0-9_-]{1,64}\Z')
# key sources whose settings would put a secret in the registry
_SECRET_SOURCES = ('raw',)


class ITenantDirectory(zope.interface.Interface):
    """What :class:`~zodbkmi.persistent.EncryptedPersistent` asks about
    shredded tenants, to raise
    :class:`~zodbkmi.exceptions.KeyDestroyedError` (registered by
    :func:`register_tenants`)."""

    def destroyed_by(dek_id):
        """The id of the tenant whose shred destroyed ``dek_id``, or
        None."""

    def is_shredded(tenant_id):
        """Whether the tenant ``tenant_id`` was shredded (or is being)."""


@implementer(IKeyEncryptingKey)
class TenantScopedKEK:
    """A shared KEK seen under a tenant's own KEK id.

    Wraps and unwraps with ``base`` (any IKeyEncryptingKey: AES, RSA, a
    KMS, whatever a future kind needs: other attributes are ``base``'s);
    its ``key_id`` is ``base.key_id + ':tenant:' + tenant_id``.  The
    wrapped-DEK header binds that id, so a DEK of one tenant is never taken
    for another's, and the facility keeps an active DEK per tenant."""

    def __init__(self, base, tenant_id):
        self.base = as_kek(base)
        self.tenant_id = tenant_id
        self.key_id = '%s:tenant:%s' % (self.base.key_id, tenant_id)
        if len(self.key_id) > 255:
            raise TenantError('tenant %s: the scoped KEK id would be longer '
                              'than 255 characters' % tenant_id, tenant_id)
        self.suite = self.base.suite

    def wrap(self, dek, aad):
        return self.base.wrap(dek, aad)

    def unwrap(self, blob, aad):
        return self.base.unwrap(blob, aad)

    def __getattr__(self, name):
        if name.startswith('__') or name == 'base':
            raise AttributeError(name)
        return getattr(self.base, name)

    def __repr__(self):
        return '<%s %s>' % (type(self).__name__, self.key_id)


@implementer(IKeyHolder)
class TenantKeyHolder:
    """The key holder of one tenant (registered by
    :func:`register_tenants` as the IKeyHolder utility named
    ``"tenant:" + tenant_id``)."""

    previous_keys = ()

    def __init__(self, tenant_id, key):
        self.tenant_id = tenant_id
        self.key = key

    def __repr__(self):
        return '<%s %s (KEK %s)>' % (type(self).__name__, self.tenant_id,
                                     self.key.key_id)


def _now():
    return datetime.datetime.now(datetime.timezone.utc).strftime(
        '%Y-%m-%dT%H:%M:%SZ')


def check_tenant_id(tenant_id):
    if not isinstance(tenant_id, str) or not _TENANT_ID.match(tenant_id):
        raise TenantError('tenant id %r: use 1 to 64 letters, digits, "_" '
                          'and "-"' % (str(tenant_id)[:70],), tenant_id)
    return tenant_id


def _canonical(obj):
    return json.dumps(obj, sort_keys=True, separators=(',', ':'),
                      ensure_ascii=True).encode('ascii')


@implementer(ITenantDirectory)
class TenantRegistry:
    """The tenant registry in the directory ``path`` (see the module
    docstring); made, mode 0700, when ``create`` is true."""

    def __init__(self, path, create=True):
        self.path = os.path.abspath(path)
        if not os.path.isdir(self.path):
            if not create:
                raise KeyStoreError('no tenant registry at %s' % self.path)
            os.makedirs(self.path, mode=0o700, exist_ok=True)
            os.chmod(self.path, 0o700)
        self._lock = threading.RLock()
        self._cache = None      # (mtime_ns, size, data)
        self._keks = {}

    def __repr__(self):
        return '<%s %s>' % (type(self).__name__, self.path)

    # -- files ---------------------------------------------------------

    def _file(self, name):
        return os.path.join(self.path, name)

    @property
    def public_key_path(self):
        """The PEM file of the public key that verifies receipts."""
        return self._file('receipt-signing.pub')

    @property
    def audit_log_path(self):
        return self._file('audit.log')

    def key_file(self, tenant_id):
        return os.path.join(self.path, 'keys', tenant_id + '.key')

    def _journal(self, tenant_id):
        return self._file('shred-%s.json' % tenant_id)

    def _load(self):
        name = self._file('tenants.json')
        try:
            st = os.stat(name)
        except FileNotFoundError:
            return {'format': FORMAT, 'version': VERSION, 'tenants': {}}
        if st.st_mode & 0o077:
            raise KeyStoreError('tenant registry %s has mode %o: group and '
                                'others must have no access (chmod 600 %s)'
                                % (name, st.st_mode & 0o777, name))
        cached = self._cache
        if cached and cached[:2] == (st.st_mtime_ns, st.st_size):
            return cached[2]
        with open(name, 'rb') as f:
            raw = f.read()
        try:
            data = json.loads(raw)
        except ValueError:
            raise KeyStoreError('tenant registry %s is not JSON' % name) \
                from None
        if (not isinstance(data, dict) or data.get('format') != FORMAT
                or not isinstance(data.get('tenants'), dict)):
            raise KeyStoreError('%s is not a zodbkmi tenant registry' % name)
        if data.get('version') != VERSION:
            raise KeyStoreError('tenant registry %s has version %r; this '
                                'zodbkmi reads version %d'
                                % (name, data.get('version'), VERSION))
        self._cache = (st.st_mtime_ns, st.st_size, data)
        return data

    def _save(self, data):
        write_atomic(self._file('tenants.json'),
                     json.dumps(data, indent=1, sort_keys=True).encode()
                     + b'\n', 0o600)
        self._cache = None

    # -- reading ---------------------------------------------------------

    def tenants(self):
        """{tenant id: record (a dict: kind, kek_id, deks, state, ...)}."""
        return dict(self._load()['tenants'])

    def record(self, tenant_id):
        record = self._load()['tenants'].get(tenant_id)
        if record is None:
            raise TenantError('no tenant %s in the tenant registry %s'
                              % (tenant_id, self.path), tenant_id)
        return record

    def destroyed_by(self, dek_id):
        for tid, record in self._load()['tenants'].items():
            if record['state'] != ACTIVE and dek_id in record['deks']:
                return tid
        return None

    def is_shredded(self, tenant_id):
        record = self._load()['tenants'].get(tenant_id)
        return record is not None and record['state'] != ACTIVE

    def tenant_of_key(self, dek_id):
        """The tenant whose DEKs include ``dek_id``, or None."""
        for tid, record in self._load()['tenants'].items():
            if dek_id in record['deks']:
                return tid
        return None

    def kek(self, tenant_id, shared=None, environ=None):
        """The KEK of an active tenant (an IKeyEncryptingKey); ``shared``
        is the shared KEK of a tenant of kind ``shared``."""
        record = self.record(tenant_id)
        if record['state'] != ACTIVE:
            raise TenantError('tenant %s was shredded' % tenant_id,
                              tenant_id)
        kek = self._keks.get(tenant_id)
        if kek is not None:
            return kek
        kind = record['kind']
        if kind == 'file':
            kek = AESKeyEncryptingKey(base64.b64decode(read_secret_file(
                self.key_file(tenant_id), 'tenant key').strip()))
        elif kind == 'shared':
            if shared is None:
                raise TenantError('tenant %s has DEKs under the shared KEK '
                                  '%s: give the shared KEK'
                                  % (tenant_id, record['shared_kek_id']),
                                  tenant_id)
            kek = TenantScopedKEK(shared, tenant_id)
            if kek.base.key_id != record['shared_kek_id']:
                raise TenantError('tenant %s has DEKs under the shared KEK '
                                  '%s, not %s' % (
                                      tenant_id, record['shared_kek_id'],
                                      kek.base.key_id), tenant_id)
        else:
            from zodbkmi.sources import kek_from_params
            kek = kek_from_params(record['params'], environ=environ)
        if kek.key_id != record['kek_id']:
            raise TenantError('tenant %s: its key source gives KEK %s, the '
                              'registry names %s' % (tenant_id, kek.key_id,
                                                     record['kek_id']),
                              tenant_id)
        self._keks[tenant_id] = kek
        return kek

    def holder(self, tenant_id, shared=None, environ=None):
        return TenantKeyHolder(tenant_id,
                               self.kek(tenant_id, shared, environ))

    # -- creating ----------------------------------------------------------

    def create(self, tenant_id, facility, kind='file', shared=None,
               params=None, environ=None):
        """Create the tenant ``tenant_id`` with a key of ``kind`` and an
        active DEK in ``facility``'s key store; return its
        :class:`TenantKeyHolder`.

        ``kind`` ``"file"``: a new AES-256 KEK in ``keys/<id>.key``.
        ``"shared"``: a DEK of its own under ``shared`` (a KEK, e.g. the
        default key holder's ``key``).  ``"source"``: a new key in the key
        source ``params`` (settings of :mod:`zodbkmi.sources.settings`:
        ``vaultTransit`` creates the Transit key, ``pkcs11`` the token
        object; other sources must hold the key already).
        """
        check_tenant_id(tenant_id)
        if kind not in KINDS:
            raise TenantError('tenant %s: kind %r is not one of %s'
                              % (tenant_id, kind, ', '.join(KINDS)),
                              tenant_id)
        with self._lock:
            self._signing_key()     # made with the registry
            data = self._load()
            if tenant_id in data['tenants']:
                raise TenantError('tenant %s exists already' % tenant_id,
                                  tenant_id)
            record = {'kind': kind, 'created': _now(), 'state': ACTIVE,
                      'deks': []}
            if kind == 'file':
                path = self.key_file(tenant_id)
                os.makedirs(os.path.dirname(path), mode=0o700,
                            exist_ok=True)
                key = os.urandom(32)
                write_atomic(path, base64.b64encode(key) + b'\n', 0o600,
                             overwrite=False)
                kek = AESKeyEncryptingKey(key)
            elif kind == 'shared':
                if shared is None:
                    raise TenantError('tenant %s: kind shared needs the '
                                      'shared KEK' % tenant_id, tenant_id)
                kek = TenantScopedKEK(shared, tenant_id)
                record['shared_kek_id'] = kek.base.key_id
            else:
                kek = self._create_in_source(tenant_id, params, environ)
                record['params'] = params
            for tid, other in data['tenants'].items():
                if other['kek_id'] == kek.key_id:
                    raise TenantError('tenant %s: KEK %s is the key of '
                                      'tenant %s already' % (
                                          tenant_id, kek.key_id, tid),
                                      tenant_id)
            record['kek_id'] = kek.key_id
            record['deks'].append(facility.create_key(kek))
            data = dict(data, tenants=dict(data['tenants']))
            data['tenants'][tenant_id] = record
            self._save(data)
            self._keks[tenant_id] = kek
            return TenantKeyHolder(tenant_id, kek)

    def _create_in_source(self, tenant_id, params, environ):
        from zodbkmi.sources import kek_from_params
        from zodbkmi.sources.settings import parse_params
        if not isinstance(params, dict):
            raise TenantError('tenant %s: kind source needs the settings '
                              'of a key source' % tenant_id, tenant_id)
        params = parse_params(params)
        source = params['source']
        if source in _SECRET_SOURCES:
            raise TenantError('tenant %s: a %s key source would put the key '
                              'in the tenant registry' % (tenant_id, source),
                              tenant_id)
        if source == 'vaultTransit':
            from zodbkmi.sources.vault import client_from_params
            client = client_from_params(params, environ)
            mount = params.get('mount', 'transit')
            client.request('POST', '%s/keys/%s' % (mount, params['keyName']),
                           {'type': 'aes256-gcm96', 'derived': True},
                           what='creating Transit key %s' % params['keyName'])
        elif source == 'pkcs11':
            from zodbkmi.sources.pkcs11 import create_key
            from zodbkmi.sources.pkcs11 import read_pin
            create_key(params['library'], params['tokenLabel'],
                       params['keyLabel'], read_pin(params, environ))
        return kek_from_params(params, environ=environ)

    # -- receipts ------------------------------------------------------------

    def _signing_key(self):
        path = self._file('receipt-signing.key')
        if os.path.exists(path):
            return serialization.load_pem_private_key(
                read_secret_file(path, 'receipt signing key'), None)
        key = Ed25519PrivateKey.generate()
        write_atomic(self.public_key_path, key.public_key().public_bytes(
            serialization.Encoding.PEM,
            serialization.PublicFormat.SubjectPublicKeyInfo), 0o644)
        write_atomic(path, key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()), 0o600, overwrite=False)
        return key

    def public_key_pem(self):
        """The PEM of the public key that verifies this registry's
        receipts (give it to the auditor when the registry is made)."""
        self._signing_key()
        with open(self.public_key_path, 'rb') as f:
            return f.read()


def signer_id(public_key):
    raw = public_key.public_bytes(serialization.Encoding.Raw,
                                  serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:32]


def verify_receipt(receipt, public_key_pem):
    """Check the signature of a destruction receipt (a dict or its JSON)
    with the registry's public key (PEM bytes); return the receipt as a
    dict.  Raises :class:`~zodbkmi.exceptions.AuthenticationError` when it
    was altered or signed by another key."""
    from zodbkmi.exceptions import AuthenticationError
    if isinstance(receipt, (str, bytes)):
        receipt = json.loads(receipt)
    public = serialization.load_pem_public_key(public_key_pem)
    if not isinstance(public, Ed25519PublicKey):
        raise AuthenticationError('receipts are verified with an Ed25519 '
                                  'public key')
    body = {k: v for k, v in receipt.items() if k != 'signature'}
    sig = receipt.get('signature') or {}
    if (body.get('format') != RECEIPT_FORMAT
            or body.get('version') != RECEIPT_VERSION
            or sig.get('alg') != 'Ed25519'
            or sig.get('signer') != signer_id(public)):
        raise AuthenticationError('not a receipt signed by this key')
    try:
        public.verify(base64.b64decode(sig.get('value', '')),
                      _canonical(body))
    except (InvalidSignature, ValueError):
        raise AuthenticationError('the receipt signature does not verify: '
                                  'it was altered') from None
    return receipt


# -- registering the tenants' key holders -------------------------------------

def register_tenants(registry, shared=None, site_manager=None,
                     environ=None):
    """Register the key holder of every active tenant of ``registry`` (the
    IKeyHolder utility named ``"tenant:" + id``) and ``registry`` itself as
    the :class:`ITenantDirectory`; return the number of tenants.
    ``shared``: the shared KEK of tenants of kind ``shared``."""
    sm = site_manager or zope.component.getGlobalSiteManager()
    sm.registerUtility(registry, ITenantDirectory)
    n = 0
    for tid, record in registry.tenants().items():
        name = TENANT_PREFIX + tid
        if record['state'] != ACTIVE:
            sm.unregisterUtility(provided=IKeyHolder, name=name)
            continue
        sm.registerUtility(registry.holder(tid, shared, environ),
                           IKeyHolder, name)
        n += 1
    return n


# -- crypto-shredding ---------------------------------------------------

def _entries_of(facility, kek_id):
    """The ids of the DEKs ``kek_id`` wraps, in the facility's key store or
    on its key server (:class:`~zodbkmi.client.LocalKeyManagementFacility`:
    listed there, deleted there by the shred)."""
    store = getattr(facility, 'key_store', None)
    if store is not None:
        return [e.dek_id for e in store.entries() if e.kek_id == kek_id]
    metadata = getattr(facility, 'metadata', None)
    if metadata is None:
        raise TenantError('shred needs a facility with a key store or a key '
                          'server (%s has neither)' % type(facility).__name__)
    return [m['dek_id'] for m in metadata() if m['kek_id'] == kek_id]


def _preflight_kek(registry, tenant_id, record, environ):
    """Check that the service holding the tenant's KEK answers; raise
    TenantError (nothing destroyed) when it does not."""
    kind = record['kind']
    try:
        if kind == 'file':
            if not os.path.exists(registry.key_file(tenant_id)):
                return False
            read_secret_file(registry.key_file(tenant_id), 'tenant key')
        elif kind == 'source':
            params = record['params']
            if params['source'] == 'vaultTransit':
                registry.kek(tenant_id, environ=environ).info()
            else:
                registry.kek(tenant_id, environ=environ)
    except (KeySourceError, KeyStoreError) as e:
        raise TenantError('tenant %s: the key service is unreachable, '
                          'nothing was destroyed (%s)' % (tenant_id, e),
                          tenant_id) from None
    return True


def _destroy_kek(registry, tenant_id, record, environ):
    """Destroy the tenant's own KEK where its source allows; return a
    description for the receipt."""
    kind = record['kind']
    if kind == 'shared':
        return {'kind': 'shared', 'id': record['shared_kek_id'],
                'destroyed': False,
                'note': 'shared KEK kept; only the DEKs were destroyed'}
    if kind == 'file':
        _remove_file(registry.key_file(tenant_id))
        return {'kind': 'file', 'id': record['kek_id'], 'destroyed': True}
    params = record['params']
    source = params['source']
    out = {'kind': source, 'id': record['kek_id'], 'destroyed': True}
    if source == 'file':
        _remove_file(params['path'])
    elif source == 'vaultTransit':
        from zodbkmi.sources.vault import client_from_params
        client = client_from_params(params, environ)
        path = '%s/keys/%s' % (params.get('mount', 'transit'),
                               params['keyName'])
        try:
            client.request('POST', path + '/config',
                           {'deletion_allowed': True})
            client.request('DELETE', path)
        except KeySourceError as e:
            if getattr(e, 'status', None) != 404:
                raise
    elif source == 'vaultKV':
        from zodbkmi.sources.vault import client_from_params
        client = client_from_params(params, environ)
        client.request('DELETE', '%s/metadata/%s' % (
            params.get('mount', 'secret'), params['path']))
    elif source == 'pkcs11':
        _destroy_pkcs11(params, environ)
    else:
        out['destroyed'] = False
        out['note'] = 'a %s key source cannot be destroyed from here' % source
    return out


def _destroy_pkcs11(params, environ):
    from zodbkmi.sources import pkcs11 as p
    with p._open_lock:
        session = p._session(params['library'], params['tokenLabel'],
                             p.read_pin(params, environ), rw=True)
    try:
        for key in session.get_objects({
                p._p11.Attribute.LABEL: params['keyLabel'],
                p._p11.Attribute.CLASS: p._p11.ObjectClass.SECRET_KEY}):
            key.destroy()
    finally:
        session.close()


def _remove_file(path):
    """Overwrite ``path`` with zeros, then remove it (the overwrite does not
    reach copies a file system or a disk keeps elsewhere: see
    ``docs/security.rst``)."""
    try:
        fd = os.open(path, os.O_WRONLY)
    except FileNotFoundError:
        return
    try:
        size = os.fstat(fd).st_size
        os.write(fd, b'\0' * size)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.unlink(path)
    try:
        dfd = os.open(os.path.dirname(path) or '.', os.O_RDONLY)
    except OSError:   # pragma: no cover
        return
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def shred(registry, facility, tenant_id, operator=None, confirm=False,
          default_key=None, environ=None, audit_log=None, _step=None):
    """Crypto-shred the tenant ``tenant_id``: destroy its DEKs in
    ``facility``'s key store and in every cache of this process, and its
    own KEK where the source allows; return the signed destruction receipt
    (a dict), which is also appended to the registry's ``audit.log`` (and
    to ``audit_log`` when given).

    ``confirm`` must be true.  ``default_key``, the default key holder's
    KEK, is never destroyed: a tenant whose DEKs it wraps is refused.
    Refused (:class:`~zodbkmi.exceptions.TenantError`, nothing destroyed):
    an unknown tenant, a KEK or DEK shared with another tenant, the default
    key, an unreachable key service.  The shred is journaled: after a crash,
    calling it again finishes it.
    """
    if not confirm:
        raise TenantError('shred of tenant %s not confirmed: nothing was '
                          'destroyed' % tenant_id, tenant_id)
    operator = operator or _operator()
    with registry._lock:
        record = registry.record(tenant_id)
        journal = registry._journal(tenant_id)
        if record['state'] == SHREDDED:
            raise TenantError('tenant %s was shredded already (%s)'
                              % (tenant_id, record.get('shredded')),
                              tenant_id)
        if record['state'] == ACTIVE:
            plan = _plan(registry, facility, tenant_id, record, default_key,
                         environ, operator)
            write_atomic(journal, _canonical(plan), 0o600)
            data = registry._load()
            data = dict(data, tenants=dict(data['tenants']))
            data['tenants'][tenant_id] = dict(
                record, state=SHREDDING, deks=plan['deks'])
            registry._save(data)
        else:
            with open(journal, 'rb') as f:
                plan = json.load(f)
        held = registry._keks.pop(tenant_id, None)
        if hasattr(held, 'close'):      # a PKCS#11 session, a client
            held.close()
        sm = zope.component.getGlobalSiteManager()
        sm.unregisterUtility(provided=IKeyHolder,
                             name=TENANT_PREFIX + tenant_id)
        for n, dek_id in enumerate(plan['deks']):
            try:
                facility.delete(dek_id)
            except UnknownKeyError:
                pass        # destroyed by the run that crashed
            if _step is not None:
                _step(n)
        kek = _destroy_kek(registry, tenant_id, record, environ)
        facility.clear_cache()
        receipt = _receipt(registry, tenant_id, plan, kek)
        line = _canonical(receipt) + b'\n'
        for log in filter(None, (registry.audit_log_path, audit_log)):
            fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, line)
                os.fsync(fd)
            finally:
                os.close(fd)
        data = registry._load()
        data = dict(data, tenants=dict(data['tenants']))
        data['tenants'][tenant_id] = dict(
            data['tenants'][tenant_id], state=SHREDDED,
            shredded=receipt['time'])
        registry._save(data)
        os.unlink(journal)
        return receipt


def _operator():
    try:
        return getpass.getuser()
    except Exception:   # pragma: no cover (no user name at all)
        return 'uid %d' % os.getuid()


def _plan(registry, facility, tenant_id, record, default_key, environ,
          operator):
    """Check every refusal; return the journal of the shred."""
    try:
        deks = sorted(set(record['deks'])
                      | set(_entries_of(facility, record['kek_id'])))
    except (KeyStoreError, KeySourceError, KeyServerError) as e:
        raise TenantError('tenant %s: the key service is unreachable, '
                          'nothing was destroyed (%s)' % (tenant_id, e),
                          tenant_id) from None
    for tid, other in registry.tenants().items():
        if tid == tenant_id:
            continue
        if other['kek_id'] == record['kek_id'] or set(
                other['deks']) & set(deks):
            raise TenantError('tenant %s shares its key with tenant %s: '
                              'nothing was destroyed' % (tenant_id, tid),
                              tenant_id)
    if default_key is not None:
        default = as_kek(default_key).key_id
        defaults = set(_entries_of(facility, default))
        if record['kek_id'] == default or defaults & set(deks):
            raise TenantError('tenant %s uses the default key (KEK %s): '
                              'nothing was destroyed' % (tenant_id, default),
                              tenant_id)
    _preflight_kek(registry, tenant_id, record, environ)
    return {'tenant': tenant_id, 'deks': deks, 'kek_id': record['kek_id'],
            'kind': record['kind'], 'operator': operator,
            'started': _now()}


def _receipt(registry, tenant_id, plan, kek):
    key = registry._signing_key()
    body = {'format': RECEIPT_FORMAT, 'version': RECEIPT_VERSION,
            'tenant': tenant_id, 'deks': plan['deks'], 'kek': kek,
            'operator': plan['operator'], 'started': plan['started'],
            'time': _now(), 'host': socket.gethostname(),
            'registry': registry.path}
    return dict(body, signature={
        'alg': 'Ed25519', 'signer': signer_id(key.public_key()),
        'value': base64.b64encode(key.sign(_canonical(body))).decode()})


# -- what each tenant's keys cover ------------------------------------------

def scan_by_tenant(storage, registry, facility=None):
    """Count the current object states of ``storage`` per tenant: return
    {tenant id or ``"(default)"`` or ``"(plain)"``: {"objects", "bytes",
    "shredded", "state"}}.  A state sealed under a DEK that a shred
    destroyed counts in ``shredded`` of its tenant.  ``facility`` (its key
    store) attributes DEKs the registry does not list yet (rotations)."""
    from zodbkmi.migrate.scan import iter_records
    owners = {}
    states = {}
    for tid, record in registry.tenants().items():
        states[tid] = record['state']
        for dek in record['deks']:
            owners[dek] = tid
        if facility is not None and record['state'] == ACTIVE:
            for dek in _entries_of(facility, record['kek_id']):
                owners[dek] = tid
    rows = {tid: {'objects': 0, 'bytes': 0, 'shredded': 0, 'state': state}
            for tid, state in states.items()}
    live = set()
    if facility is not None:
        live = set(facility.keys())
    for oid, tid, data in iter_records(storage):
        dek = _state_dek_id(data)
        if dek is None:
            name = '(plain)'
        else:
            name = owners.get(dek, '(default)')
        row = rows.setdefault(name, {'objects': 0, 'bytes': 0,
                                     'shredded': 0, 'state': ''})
        row['objects'] += 1
        row['bytes'] += len(data)
        if dek is not None and name in states and (
                states[name] != ACTIVE
                or (facility is not None and dek not in live)):
            row['shredded'] += 1
    return rows


class _Stub:
    def __init__(self, *args, **kw):
        pass

    def __setstate__(self, state):
        pass


class _RecordUnpickler:
    """Reads the state of a ZODB record without importing its classes."""

    def __init__(self, data):
        import io
        import pickle

        class U(pickle.Unpickler):
            def find_class(self, module, name):
                return _Stub

            def persistent_load(self, pid):
                return None

        self._u = U(io.BytesIO(data))

    def state(self):
        self._u.load()
        return self._u.load()


def _state_dek_id(data):
    """The DEK id (hex) of the EncryptedPersistent state in the ZODB
    record ``data``, or None for any other record."""
    from zodbkmi.format import envelope
    try:
        state = _RecordUnpickler(data).state()
    except Exception:
        return None
    if type(state) is tuple and state and type(state[0]) is bytes:
        state = state[0]
    if type(state) is not bytes:
        return None
    for context in (envelope.CONTEXT_STATE, envelope.CONTEXT_DATA):
        try:
            return envelope.read_dek_id(state, context).hex()
        except Exception:
            continue
    return None
