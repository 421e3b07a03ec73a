"""ZODB's and ZEO's own storage test suites run against EncryptingStorage.

As zc.zlibstorage does, ZODB's test classes are reused with an ``open()``
that wraps the storage under test.
"""
import unittest

import ZEO.tests.testZEO
import ZODB.FileStorage
import ZODB.tests.StorageTestBase
import ZODB.tests.testblob
import ZODB.tests.testFileStorage
import ZODB.tests.util

from tests.storage_support import wrap


class FileStorageTests(ZODB.tests.testFileStorage.FileStorageTests):

    def open(self, **kwargs):
        self._storage = wrap(
            ZODB.FileStorage.FileStorage('FileStorageTests.fs', **kwargs))

    # These read FileStorage internals or raw record bytes of the base
    # storage, which are ciphertext under the wrapper by design.
    def checkCorruptionInPack(self):
        """Patches the raw Data.fs of the base storage."""

    def checkRestoreAcrossPack(self):
        """Restores raw records read from the base storage into itself."""


class FileStorageTestsWithBlobsEnabled(FileStorageTests):

    def open(self, **kwargs):
        kwargs.setdefault('blob_dir', 'blobs')
        FileStorageTests.open(self, **kwargs)


class FileStorageRecoveryTest(
        ZODB.tests.testFileStorage.FileStorageRecoveryTest):

    def setUp(self):
        ZODB.tests.StorageTestBase.StorageTestBase.setUp(self)
        self._storage = wrap(
            ZODB.FileStorage.FileStorage('Source.fs', create=True))
        self._dst = wrap(ZODB.FileStorage.FileStorage('Dest.fs', create=True))

    def new_dest(self):
        return wrap(ZODB.FileStorage.FileStorage('Dest.fs'))


class ZEOFileStorageTests(ZEO.tests.testZEO.FileStorageTests):
    """A ZEO server storing ciphertext, clients with the keys."""

    def _wrap_client(self, client):
        return wrap(client)


def _blob_storage(name, blob_dir):
    return wrap(ZODB.FileStorage.FileStorage(name, blob_dir=blob_dir))


def test_suite():
    suite = unittest.TestSuite()
    loader = unittest.defaultTestLoader
    loader_prefix = loader.testMethodPrefix
    loader.testMethodPrefix = 'check'
    try:
        for klass in (FileStorageTests, FileStorageTestsWithBlobsEnabled,
                      FileStorageRecoveryTest, ZEOFileStorageTests):
            s = loader.loadTestsFromTestCase(klass)
            s.layer = ZODB.tests.util.MininalTestLayer(
                'zodbkmi.storage.%s' % klass.__name__)
            suite.addTest(s)
    finally:
        loader.testMethodPrefix = loader_prefix
    suite.addTest(ZODB.tests.testblob.storage_reusable_suite(
        'EncryptedBlobFileStorage', _blob_storage,
        test_blob_storage_recovery=True, test_packing=True))
    return suite
