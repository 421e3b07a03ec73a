"""Tests of zodbkmi.client's place: the key server's client in a module
of its own, below the server, and its old import paths."""
import ast
import os
import subprocess
import sys
import unittest

import zodbkmi

SRC = os.path.dirname(zodbkmi.__file__)


def _imports(module):
    """The zodbkmi modules ``module`` (a file under src/zodbkmi) imports
    at its top level (not inside functions)."""
    with open(os.path.join(SRC, module), encoding='utf-8') as f:
        tree = ast.parse(f.read())
    found = set()
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.module and \
                node.module.startswith('zodbkmi'):
            found.add(node.module)
            if node.module == 'zodbkmi':
                found.update('zodbkmi.' + a.name for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names
                         if a.name.startswith('zodbkmi'))
    return found


class LayeringTests(unittest.TestCase):

    def test_client_never_imports_the_server(self):
        with open(os.path.join(SRC, 'client.py'), encoding='utf-8') as f:
            tree = ast.parse(f.read())
        everywhere = {n.module for n in ast.walk(tree)
                      if isinstance(n, ast.ImportFrom)}
        self.assertNotIn('zodbkmi.rest', everywhere)
        self.assertNotIn('zodbkmi.server', everywhere)

    def test_server_does_not_import_the_client(self):
        self.assertNotIn('zodbkmi.client', _imports('rest.py'))
        self.assertNotIn('zodbkmi.facility', _imports('rest.py'))

    def test_client_imported_first(self):
        # the facility module names the client lazily: no import cycle,
        # whichever module is imported first
        for first in ('zodbkmi.client', 'zodbkmi.facility', 'zodbkmi.rest'):
            code = ('import %s, zodbkmi.facility as f, zodbkmi.client as c;'
                    'assert f.LocalKeyManagementFacility is '
                    'c.LocalKeyManagementFacility' % first)
            env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
            subprocess.run([sys.executable, '-c', code], check=True, env=env)

    def test_api_prefix_agrees_with_the_server(self):
        from zodbkmi import client
        from zodbkmi import rest
        self.assertEqual(client.API_PREFIX, rest.API_PREFIX)


class OldNamesTests(unittest.TestCase):

    def test_facility_names(self):
        from zodbkmi import client
        from zodbkmi.facility import LocalKeyManagementFacility
        self.assertIs(LocalKeyManagementFacility,
                      client.LocalKeyManagementFacility)
        import zodbkmi.facility
        self.assertIn('LocalKeyManagementFacility', dir(zodbkmi.facility))

    def test_rest_names(self):
        from zodbkmi import client
        from zodbkmi.rest import HTTPTransport
        from zodbkmi.rest import WSGITransport
        from zodbkmi.rest import check_url
        self.assertIs(HTTPTransport, client.HTTPTransport)
        self.assertIs(WSGITransport, client.WSGITransport)
        self.assertIs(check_url, client.check_url)

    def test_unknown_names_still_raise(self):
        import zodbkmi.facility
        import zodbkmi.rest
        with self.assertRaises(AttributeError):
            zodbkmi.facility.NoSuchThing
        with self.assertRaises(AttributeError):
            zodbkmi.rest.NoSuchThing

    def test_works_through_the_old_name(self):
        import tempfile
        import shutil
        from zodbkmi.facility import KeyManagementFacility
        from zodbkmi.facility import LocalKeyManagementFacility
        from zodbkmi.testing import setupRestApi
        tmp = tempfile.mkdtemp(prefix='zodbkmi-client-')
        self.addCleanup(shutil.rmtree, tmp, True)
        master = KeyManagementFacility(os.path.join(tmp, 'keys'))
        local = LocalKeyManagementFacility('https://127.0.0.1:1')
        setupRestApi(local, master)
        kek = local.generate()
        self.assertEqual(local.decrypt(kek, local.encrypt(kek, b'x')), b'x')
        self.assertEqual(len(master), 1)
