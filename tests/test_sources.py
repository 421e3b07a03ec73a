"""Tests of zodbkmi.sources run against real servers: docs/keysources.rst.

The document needs an OpenBao dev server and a SoftHSM2 token, so it runs
here, in a layer with both, instead of in tests/test_docs.py.
"""
import os
import unittest

from tests import test_docs
from tests.bao import BaoLayer
from tests.bao import ROOT_TOKEN
from tests.bao import free_port
from tests.bao import skip_requested as skip_bao
from tests.softhsm import PIN
from tests.softhsm import SoftHSMLayer
from tests.softhsm import skip_requested as skip_hsm

DOC = os.path.join(test_docs.TOP, 'docs', 'keysources.rst')


class ServersLayer(BaoLayer, SoftHSMLayer):
    """OpenBao and SoftHSM2 together."""

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


def tearDown(test):
    for k, v in test.globs['_old_env'].items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    test_docs.tearDown(test)


def test_suite():
    suite = unittest.TestSuite()
    if skip_bao() or skip_hsm():
        return suite
    docs = test_docs.doc_suite(DOC, setUp=setUp, tearDown=tearDown)
    docs.layer = ServersLayer
    suite.addTest(docs)
    return suite
