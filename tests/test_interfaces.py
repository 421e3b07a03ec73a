"""The real implementations provide the interfaces of zodbkmi.interfaces
(``verifyObject``: every attribute and method, with signatures that
accept what the interface says)."""
import base64
import os
import shutil
import tempfile
import unittest

from zope.interface import providedBy
from zope.interface.verify import verifyClass
from zope.interface.verify import verifyObject

from zodbkmi import interfaces as I  # noqa: E741


class _TmpDir(unittest.TestCase):

    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix='zodbkmi-interfaces-')
        self.addCleanup(shutil.rmtree, self.tmp, True)

    def path(self, *names):
        return os.path.join(self.tmp, *names)


FACILITY_INTERFACES = (
    I.IEncryptionService, I.IKeyGenerationService, I.IKeyManagementFacility,
    I.IDataKeyCreation, I.IKeyLifecycle, I.IInPlaceFileEncryption,
    I.IRecordFastPath, I.IMetadataEncryption,
    I.IExtendedKeyManagementFacility)


class FacilityTests(_TmpDir):

    def _check(self, facility, *extra):
        for iface in FACILITY_INTERFACES + extra:
            self.assertTrue(iface.providedBy(facility), iface)
            self.assertTrue(verifyObject(iface, facility), iface)

    def test_master(self):
        from zodbkmi.facility import KeyManagementFacility
        facility = KeyManagementFacility(self.path('keys'))
        self._check(facility)
        # has the method, does not declare it (see IKeyRewrapping)
        self.assertTrue(verifyObject(I.IKeyRewrapping, facility,
                                     tentative=True))
        self.assertEqual(len(list(providedBy(facility))), 1)

    def test_local(self):
        from zodbkmi.client import LocalKeyManagementFacility
        facility = LocalKeyManagementFacility('https://127.0.0.1:1')
        self._check(facility)
        self.assertFalse(I.IKeyRewrapping.providedBy(facility))

    def test_testing(self):
        from zodbkmi.testing import TestingKeyManagementFacility
        self._check(TestingKeyManagementFacility(self.path('keys')))

    def test_encrypt_and_decrypt_take_an_oid(self):
        # the oid argument of the interface is the implementations' one
        from zodbkmi.facility import KeyManagementFacility
        facility = KeyManagementFacility(self.path('keys'))
        kek = os.urandom(32)
        facility.create_key(kek)
        oid = b'\0' * 7 + b'\1'
        record = facility.encrypt(kek, b'state', oid=oid)
        self.assertEqual(facility.decrypt(kek, record, oid=oid), b'state')
        self.assertEqual(facility.key_id_of(record, oid=oid),
                         facility.active_key_id(kek))
        names = I.IEncryptionService['encrypt'].getSignatureInfo()
        self.assertEqual(names['optional'], {'oid': None})


class KeyLifecycleTests(_TmpDir):
    """The lifecycle table of zodbkmi.interfaces, through the interface's
    methods."""

    def test_transitions(self):
        from zodbkmi.exceptions import UnknownKeyError
        from zodbkmi.facility import KeyManagementFacility
        facility = KeyManagementFacility(self.path('keys'))
        kek = os.urandom(32)
        first = facility.create_key(kek)
        self.assertEqual(facility.entry(first).state, 'active')
        second = facility.rotate(kek)
        self.assertEqual(facility.entry(first).state, 'retired')
        self.assertEqual(facility.entry(second).state, 'active')
        facility.retire(second)
        facility.retire(second)       # a retired key: no change
        self.assertEqual(facility.entry(second).state, 'retired')
        self.assertIsNone(facility.active_key_id(kek))
        facility.delete(first)
        with self.assertRaises(UnknownKeyError):
            facility.entry(first)
        with self.assertRaises(UnknownKeyError):
            facility.retire(first)    # no way back from destroyed
        self.assertEqual(facility.upgrade(kek), 0)
        self.assertTrue(verifyObject(I.IKeyStoreEntry,
                                     facility.entry(second)))


class KeyStoreTests(_TmpDir):

    def test_directory_key_store(self):
        from zodbkmi.keystore import DirectoryKeyStore
        store = DirectoryKeyStore(self.path('keys'))
        self.assertTrue(verifyObject(I.IKeyStore, store))
        self.assertTrue(verifyObject(I.IKeyStoreSweep, store))

    def test_entry(self):
        from zodbkmi.format import wrapped
        from zodbkmi.kek import AESKeyEncryptingKey
        from zodbkmi.keystore import KeyStoreEntry
        kek = AESKeyEncryptingKey(os.urandom(32))
        raw_id = os.urandom(16)
        entry = KeyStoreEntry(raw_id.hex(), kek.key_id,
                              wrapped.wrap(kek, raw_id, os.urandom(32)))
        self.assertTrue(verifyObject(I.IKeyStoreEntry, entry))


class KeyHolderTests(_TmpDir):

    def _check(self, holder):
        self.assertTrue(verifyObject(I.IKeyHolder, holder))
        self.assertIsInstance(holder.previous_keys, tuple)

    def test_key_file_holder(self):
        from zodbkmi.keyholder import KeyHolder
        from zodbkmi.keyholder import write_key_file
        write_key_file(self.path('kek'), os.urandom(32))
        write_key_file(self.path('old'), os.urandom(32))
        holder = KeyHolder(self.path('kek'), previous=[self.path('old')])
        self._check(holder)
        self.assertEqual(len(holder.previous_keys), 1)

    def test_settings_holder(self):
        from zodbkmi.sources import SettingsKeyHolder
        key = base64.b64encode(os.urandom(32)).decode('ascii')
        self._check(SettingsKeyHolder(
            {'params': {'source': 'raw', 'key': key}}))

    def test_testing_holders(self):
        from zodbkmi.testing import StaticKeyHolder
        from zodbkmi.testing import TestingKeyHolder
        self._check(TestingKeyHolder())
        self._check(StaticKeyHolder(previous_keys=[os.urandom(32)]))


class KeyEncryptingKeyTests(unittest.TestCase):

    def test_aes_and_master_key(self):
        from zodbkmi.kek import AESKeyEncryptingKey
        from zodbkmi.sources.local import MasterKey
        self.assertTrue(verifyObject(I.IKeyEncryptingKey,
                                     AESKeyEncryptingKey(os.urandom(32))))
        self.assertTrue(verifyObject(I.IKeyEncryptingKey,
                                     MasterKey(os.urandom(32))))

    def test_rsa(self):
        from zodbkmi.kek import RSAKeyEncryptingKey
        kek = RSAKeyEncryptingKey.generate(3072)
        self.assertTrue(verifyObject(I.IKeyEncryptingKey, kek))
        self.assertTrue(verifyObject(I.IKeyEncryptingKey, kek.public()))

    def test_kms_and_hsm_classes(self):
        # their objects need a server or a token (tested in their layers)
        from zodbkmi.sources.pkcs11 import PKCS11KeyEncryptingKey
        from zodbkmi.sources.vault import TransitKeyEncryptingKey
        self.assertTrue(verifyClass(I.IKeyEncryptingKey,
                                    TransitKeyEncryptingKey))
        self.assertTrue(verifyClass(I.IKeyEncryptingKey,
                                    PKCS11KeyEncryptingKey))


class OldNamesTests(unittest.TestCase):

    def test_ikeyvault(self):
        self.assertIs(I.IKeyVault, I.IKeyStore)
