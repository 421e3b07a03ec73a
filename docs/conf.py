"""Sphinx configuration for zodbkmi's documentation.

The API reference (``api/``) is autodoc of the public modules.  The suite
builds the documentation with ``sphinx-build -n -W`` (tests/test_docs.py):
every cross-reference must resolve.
"""
import os
import sys

from sphinx import addnodes
from sphinx.domains.python import PyClasslike
from sphinx.util.docstrings import prepare_docstring
from zope.interface import Interface
from zope.interface.interface import InterfaceClass
from zope.schema.interfaces import IField

# the package of this checkout (tests/run.sh passes it on PYTHONPATH too)
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                '..', 'src'))

project = 'zodbkmi'
author = 'The zodbkmi developers'
copyright = '2026, The zodbkmi developers'
extensions = ['sphinx.ext.autodoc']
master_doc = 'index'
exclude_patterns = ['_build']
html_theme = 'alabaster'

autodoc_member_order = 'bysource'
autodoc_default_options = {'members': True, 'show-inheritance': True}

# Names of other projects that docstrings and signatures mention.  There is
# no intersphinx (the build runs offline), so each is listed here, with why.
nitpick_ignore = [
    # bases of zodbkmi classes, shown by show-inheritance:
    # zodbkmi.exceptions.NoKeyHolderError (zope.component's lookup error)
    ('py:class', 'zope.interface.interfaces.ComponentLookupError'),
    # zodbkmi.persistent.EncryptedPersistent
    ('py:class', 'persistent.Persistent'),
    # zodbkmi.interfaces.IExtendedKeyManagementFacility
    ('py:class', 'zope.interface.common.mapping.IEnumerableMapping'),
]

#: Bases not shown by show-inheritance: parts of a documented class that
#: are not documented themselves (their public methods are the class's).
HIDDEN_BASES = frozenset((
    'zodbkmi.storage.blobs.BlobMethods',
    'zodbkmi.storage.checks.DowngradeChecks',
))


def _hide_bases(app, name, obj, options, bases):
    shown = [base for base in bases if '%s.%s' % (
        base.__module__, base.__qualname__) not in HIDDEN_BASES]
    bases[:] = shown or [object]


# -- zope.interface ---------------------------------------------------------
#
# autodoc does not document zope.interface interfaces: an interface is not a
# class (autodoc skips it as a module member and cannot format it), and its
# methods and attributes are descriptions (zope.interface's Method and
# Attribute) that the interface keeps, not attributes of it.  So the
# docstring of every module gets, appended, a ``py:interface`` directive for
# each interface the module defines (in the order of the source), with its
# bases, its docstring and its members: methods with the signature
# zope.interface records (without ``self``), attributes.  An interface is
# indexed as a class, so that :class:`zodbkmi.interfaces.IKeyHolder` and
# :meth:`zodbkmi.interfaces.IEncryptionService.encrypt` resolve.
# (repoze.sphinx.autointerface, maintained, does it with a documenter
# class: Sphinx 9's autodoc runs that for an ``autointerface`` directive
# naming one interface, but never for the members of ``automodule``, so
# each interface would be listed by hand, and a new one missed silently.)

class PyInterface(PyClasslike):
    """``py:interface``: a class-like description shown as "interface"
    and indexed as a ``class`` (the role :class: finds it)."""

    def get_signature_prefix(self, sig):
        return [addnodes.desc_sig_keyword('', 'interface'),
                addnodes.desc_sig_space()]

    def get_index_text(self, modname, name_cls):
        return '%s (interface in %s)' % (name_cls[0], modname)

    def add_target_and_index(self, name_cls, sig, signode):
        objtype, self.objtype = self.objtype, 'class'
        try:
            super().add_target_and_index(name_cls, sig, signode)
        finally:
            self.objtype = objtype


def _indented(text, indent):
    return [(indent + line) if line else '' for line in
            prepare_docstring(text or '')]


def _field_doc(field):
    """A zope.schema field (a ZCML directive's attribute): its title, its
    description, its type and whether it is required, without the
    cross-references to zope.schema that the field's ``getDoc`` makes."""
    kind = type(field).__name__
    facts = [kind, 'required' if field.required else 'optional']
    if not field.required and field.default is not None:
        facts.append('default ``%r``' % (field.default,))
    return '%s.\n\n%s\n\n%s.' % (
        field.title, field.description or '', ', '.join(facts))


def _is_private(interface):
    return interface.__name__.startswith('_')


def _members(interface):
    """The members of ``interface`` and of its private bases (which are not
    documented themselves), in the order of their class bodies."""
    members = {}
    for base in reversed(interface.__bases__):
        if _is_private(base):
            members.update(_members(base))
    members.update(interface.namesAndDescriptions(all=False))
    return members.items()


def _interface_lines(interface):
    """The reST of one interface."""
    lines = ['', '.. py:interface:: %s' % interface.__name__,
             '   :module: %s' % interface.__module__, '']
    bases = [base for base in interface.__bases__
             if base is not Interface and not _is_private(base)]
    if bases:
        lines += ['   Extends %s.' % ', '.join(
            ':class:`%s.%s`' % (base.__module__, base.__name__)
            for base in bases), '']
    lines += _indented(interface.__doc__, '   ')
    for name, description in _members(interface):
        signature = getattr(description, 'getSignatureString', None)
        if signature is None:
            lines += ['', '   .. py:attribute:: %s' % name, '']
        else:
            lines += ['', '   .. py:method:: %s%s' % (name, signature()), '']
        if IField.providedBy(description):
            doc = _field_doc(description)
        else:
            doc = description.getDoc()
        lines += _indented(doc, '      ')
    return lines


def _document_interfaces(app, what, name, obj, options, lines):
    if what != 'module':
        return
    for attr, value in list(vars(obj).items()):
        if (isinstance(value, InterfaceClass)
                and value.__module__ == obj.__name__
                and value.__name__ == attr and not _is_private(value)):
            lines.extend(_interface_lines(value))


def setup(app):
    app.add_directive_to_domain('py', 'interface', PyInterface)
    app.connect('autodoc-process-docstring', _document_interfaces)
    app.connect('autodoc-process-bases', _hide_bases)
