"""Tests of zodbkmi.sources run against real servers: docs/keysources.rst.

The document needs an OpenBao dev server, a SoftHSM2 token and a KMIP
server (PyKMIP), so it runs here, in a layer with all three, instead of in
tests/test_docs.py.
"""
import os
import unittest

from tests import test_docs
from tests.bao import BaoLayer
from tests.bao import ROOT_TOKEN
from tests.bao import free_port
from tests.bao import skip_requested as skip_bao
from tests.kmipserver import KmipLayer
from tests.kmipserver import skip_requested as skip_kmip
from tests.softhsm import PIN
from tests.softhsm import SoftHSMLayer
from tests.softhsm import skip_requested as skip_hsm

DOC = os.path.join(test_docs.TOP, 'docs', 'keysources.rst')


class ServersLayer(BaoLayer, SoftHSMLayer, KmipLayer):
    """OpenBao, SoftHSM2 and a KMIP server together."""

    @classmethod
    def setUp(cls):
        pass

    @classmethod
    def tearDown(cls):
        pass


_ENV = {'BAO_TOKEN': ROOT_TOKEN, 'ZODBKMI_HSM_PIN': PIN,
        'WRONG_PIN': '0000'}


def setUp(test):
    test_docs.setUp(test)
    test.globs['_old_env'] = {k: os.environ.get(k) for k in _ENV}
    os.environ.update(_ENV)
    server, hsm = BaoLayer.server, SoftHSMLayer.hsm
    test.globs.update(bao_url=server.url, bao_ca=server.ca_file,
                      hsm_library=hsm.library, hsm_token=hsm.token_label,
                      closed_port=free_port())
    kmip = KmipLayer.server
    test.globs.update(kmip_port=kmip.port, kmip_cert=kmip.cert_file,
                      kmip_key=kmip.key_file, kmip_ca=kmip.ca_file)


def tearDown(test):
    for k, v in test.globs['_old_env'].items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    test_docs.tearDown(test)


class KeyServerWithSourcesTests(unittest.TestCase):
    """The key server's vault holds DEKs wrapped by Transit and PKCS#11
    KEKs; clients (LocalKeyManagementFacility) wrap and unwrap with them,
    the server never sees a KEK."""

    layer = ServersLayer

    def setUp(self):
        import shutil
        import tempfile
        if skip_bao() or skip_hsm():
            self.skipTest('servers skipped by request')
        self.tmp = tempfile.mkdtemp(prefix='zodbkmi-test-')
        self.addCleanup(shutil.rmtree, self.tmp, True)

    def _local(self):
        from zodbkmi.facility import KeyManagementFacility
        from zodbkmi.facility import LocalKeyManagementFacility
        from zodbkmi.testing import setupRestApi
        master = KeyManagementFacility(os.path.join(self.tmp, 'keys'))
        local = LocalKeyManagementFacility('https://127.0.0.1:1')
        setupRestApi(local, master)
        return local, master

    def _keks(self):
        from zodbkmi.sources import kek_from_params
        server, hsm = BaoLayer.server, SoftHSMLayer.hsm
        server.api('POST', 'transit/keys/keyserver', {'derived': True})
        transit = kek_from_params({
            'source': 'vaultTransit', 'url': server.url,
            'token': ROOT_TOKEN, 'caFile': server.ca_file,
            'keyName': 'keyserver'})
        from zodbkmi.sources.pkcs11 import create_key
        try:
            create_key(hsm.library, hsm.token_label, 'keyserver', PIN)
        except Exception:   # made by an earlier test of the layer
            pass
        p11 = kek_from_params({
            'source': 'pkcs11', 'library': hsm.library,
            'tokenLabel': hsm.token_label, 'keyLabel': 'keyserver',
            'pinEnv': 'PIN'}, environ={'PIN': PIN})
        self.addCleanup(p11.close)
        return transit, p11

    def test_local_facility_w_external_keks(self):
        from zodbkmi.format import wrapped
        local, master = self._local()
        for kek in self._keks():
            dek_id = local.create_key(kek)
            data = local.encrypt(kek, b'via the key server')
            local.clear_cache()
            self.assertEqual(local.decrypt(kek, data), b'via the key server')
            stored = wrapped.parse(master[dek_id])
            self.assertEqual(stored.kek_id, kek.key_id)
            self.assertEqual(stored.suite, kek.suite)


def test_suite():
    suite = unittest.TestSuite()
    suite.addTest(unittest.defaultTestLoader.loadTestsFromTestCase(
        KeyServerWithSourcesTests))
    if skip_bao() or skip_hsm() or skip_kmip():
        return suite
    docs = test_docs.doc_suite(DOC, setUp=setUp, tearDown=tearDown)
    docs.layer = ServersLayer
    suite.addTest(docs)
    return suite
