"""The storages named in a Zope ``zope.conf`` or a ZEO ``zeo.conf``, by name.

An application's configuration file holds much besides its storages, in a
schema of its own (Zope's ``instancehome``, ZEO's ``<zeo>`` section) that
``ZODB.config`` does not know.  The file is read here without a schema
(``%define``, ``%include`` and ``%import`` are honoured, as by the
application), the storage section of the database asked for is taken out,
and only that section is opened with ZODB's own schema.  Neither Zope nor
ZEO need be installed to read their files.

Zope (``zope.conf``): every ``<zodb_db NAME>`` section is a database; the
default is ``main``.  ZEO (``zeo.conf``): every storage section beside the
``<zeo>`` section is a storage, named by its section name (``1`` when it
has none); the default is the only one.
"""
import io
import os
import urllib.parse

import ZConfig
import ZConfig.cfgparser
import ZConfig.schemaless

from zodbkmi.exceptions import ZodbKmiError

#: The database of a Zope configuration migrated when none is named.
ZOPE_DEFAULT = 'main'


class _Context(ZConfig.schemaless.Context):
    """Collects sections without a schema; follows ``%include``."""

    def includeConfiguration(self, section, newurl, defines):
        path = newurl
        if path.startswith('file:'):
            path = urllib.parse.unquote(urllib.parse.urlparse(path).path)
        with open(path) as f:
            _Parser(ZConfig.schemaless.Resource(f, newurl), self,
                    defines).parse(section)


class _Parser(ZConfig.cfgparser.ZConfigParser):
    """ZConfig's own parser (``%define`` substitutes as it does for the
    application), building schema-less sections."""


def read(path):
    """The top section of the configuration file ``path``, without a
    schema (raises ``ZConfig.ConfigurationError`` for a syntax error)."""
    context = _Context()
    url = 'file://' + urllib.parse.quote(os.path.abspath(path))
    with open(path) as f:
        _Parser(ZConfig.schemaless.Resource(f, url), context).parse(
            context.top)
    return context.top


def kind(top):
    """``'zope'`` (``<zodb_db>`` sections), ``'zeo'`` (a ``<zeo>``
    section) or None (a ZODB configuration: a storage or ``<zodb>``
    section)."""
    types = {section.type for section in top.sections}
    if 'zodb_db' in types:
        return 'zope'
    if 'zeo' in types:
        return 'zeo'
    return None


def _installed(imports):
    """The packages of ``%import`` lines that are installed: a Zope
    configuration may import packages for other sections (``tempstorage``
    for a ``<temporarystorage>``) that this process lacks."""
    import importlib.util
    found = []
    for package in imports:
        try:
            if importlib.util.find_spec(package) is not None:
                found.append(package)
        except (ImportError, ValueError):
            pass
    return tuple(found)


def _storage_types(imports):
    """A test of section types: True for those of a storage (the
    ``ZODB.storage`` abstract type, with what the file imports)."""
    text = ['<schema>', '<import package="ZODB"/>']
    for package in _installed(imports):
        text.append('<import package="%s"/>' % package)
    text.append('</schema>')
    schema = ZConfig.loadSchemaFile(io.StringIO('\n'.join(text)))
    storage = schema.gettype('ZODB.storage')
    return storage.hassubtype


def databases(top):
    """``{name: storage section}`` of a Zope or ZEO configuration."""
    if kind(top) == 'zope':
        found = {}
        for section in top.sections:
            if section.type == 'zodb_db':
                inner = [s for s in section.sections if s.type]
                if len(inner) == 1:
                    found[section.name] = inner[0]
        return found
    is_storage = _storage_types(top.imports)
    return {section.name or '1': section for section in top.sections
            if is_storage(section.type)}


def choose(spec, top, name):
    """The storage section of the database ``name`` (None: the default)
    of the Zope or ZEO configuration ``top`` read from ``spec``; a
    :class:`ZodbKmiError` of one line says what to pass when there is no
    such database."""
    found = databases(top)
    what = 'Zope' if kind(top) == 'zope' else 'ZEO'
    names = ', '.join(sorted(found)) or 'none'
    if name is not None:
        section = found.get(name.lower())
        if section is None:
            raise ZodbKmiError(
                'cannot open %s: the %s configuration has no database %r '
                '(its databases: %s); give --database NAME'
                % (spec, what, name, names))
        return section
    if kind(top) == 'zope' and ZOPE_DEFAULT in found:
        return found[ZOPE_DEFAULT]
    if len(found) == 1:
        return next(iter(found.values()))
    if not found:
        raise ZodbKmiError('cannot open %s: the %s configuration names no '
                           'storage' % (spec, what))
    raise ZodbKmiError(
        'cannot open %s: the %s configuration has %d databases (%s); give '
        '--database NAME' % (spec, what, len(found), names))


def render(section, imports=(), read_only=False, pre=''):
    """The ZConfig text of ``section`` (with the ``%import`` lines of its
    file), as ``ZODB.config.storageFromString`` reads it.  Values were
    substituted when read: a ``$`` is written ``$$``.  With ``read_only``
    every ``<filestorage>`` gets ``read-only true``."""
    lines = ['%%import %s' % package for package in imports] if not pre \
        else []
    header = section.type + (' ' + section.name if section.name else '')
    lines.append('%s<%s>' % (pre, header))
    items = dict(section)
    if read_only and section.type == 'filestorage':
        items['read-only'] = ['true']
    for key, values in items.items():
        for value in values:
            lines.append('%s  %s %s' % (pre, key, value.replace('$', '$$')))
    for inner in section.sections:
        lines.append(render(inner, read_only=read_only, pre=pre + '  '))
    lines.append('%s</%s>' % (pre, section.type))
    return '\n'.join(lines)


def open_storage(spec, top, name=None, read_only=False):
    """Open the storage of database ``name`` of the Zope or ZEO
    configuration ``top`` read from ``spec``."""
    import ZODB.config
    section = choose(spec, top, name)
    for path in _filestorage_paths(section):
        if not os.path.exists(path):
            # refused before FileStorage creates it (and its .lock, .tmp
            # and .index files)
            raise ZodbKmiError('cannot open %s: its database %s has no '
                               'file %s yet' % (spec, _label(top, section),
                                                path))
    return ZODB.config.storageFromString(
        render(section, _installed(top.imports), read_only))


def _label(top, section):
    for name, found in databases(top).items():
        if found is section:
            return repr(name)
    return repr(section.name)


def _filestorage_paths(section):
    """The ``path`` of every ``<filestorage>`` in ``section``."""
    if section.type == 'filestorage':
        yield from section.get('path', ())
    for inner in section.sections:
        yield from _filestorage_paths(inner)
