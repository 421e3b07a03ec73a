"""Each weakness of keas.kmi and cipher.encryptingstorage that zodbkmi's core
must not have gets a test here (see docs/security.rst)."""
import hashlib
import os
import shutil
import tempfile
import unittest

from zodbkmi import exceptions


class CoreWeaknessTests(unittest.TestCase):

    def setUp(self):
        from tests.test_facility import shared_rsa_kek
        from zodbkmi.facility import KeyManagementFacility
        self.tmp = tempfile.mkdtemp(prefix='zodbkmi-sec-')
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.facility = KeyManagementFacility(os.path.join(self.tmp, 'keys'))
        self.kek = shared_rsa_kek()
        self.dek_id = self.facility.create_key(self.kek)

    def test_no_constant_iv(self):
        # keas.kmi: AES-CBC with a constant IV, so equal plaintexts gave
        # equal ciphertexts.
        a = self.facility.encrypt(self.kek, b'A' * 64)
        b = self.facility.encrypt(self.kek, b'A' * 64)
        self.assertNotEqual(a, b)
        self.assertNotEqual(a[26:38], b[26:38])          # the nonces
        self.assertNotEqual(a[38:], b[38:])

    def test_ciphertext_is_authenticated(self):
        # keas.kmi and cipher.encryptingstorage had no MAC: a changed byte
        # decrypted to changed plaintext silently.
        data = bytearray(self.facility.encrypt(self.kek, b'A' * 64))
        data[40] ^= 0x80
        with self.assertRaises(exceptions.AuthenticationError):
            self.facility.decrypt(self.kek, bytes(data))

    def test_no_md5_key_ids(self):
        # keas.kmi named a DEK by md5(private KEK PEM).
        self.assertNotEqual(self.dek_id, hashlib.md5(self.kek).hexdigest())
        other = self.facility.create_key(self.kek)
        self.assertNotEqual(other, self.dek_id)   # random, not derived
        kek_id = self.facility.entry(self.dek_id).kek_id
        for digest in (hashlib.md5, hashlib.sha1, hashlib.sha256):
            self.assertNotIn(digest(self.kek).hexdigest()[:32], kek_id)

    def test_no_rsa_pkcs1_v15(self):
        # keas.kmi wrapped DEKs with RSA PKCS#1 v1.5 (Bleichenbacher).
        from cryptography.hazmat.primitives.asymmetric import padding
        from zodbkmi.format import wrapped
        from zodbkmi.kek import as_kek
        kek = as_kek(self.kek)
        blob = self.facility[self.dek_id]
        parsed = wrapped.parse(blob)
        self.assertEqual(parsed.suite, wrapped.SUITE_RSA_OAEP_SHA256)
        # a v1.5 wrapping of a DEK is refused, in version 1 and in version
        # 2 (even with a valid signature over it)
        v15 = kek._public.encrypt(os.urandom(32), padding.PKCS1v15())
        v1_header = wrapped.build_header(parsed.suite, parsed.dek_id,
                                         parsed.kek_id, wrapped.VERSION_1)
        with self.assertRaises(exceptions.AuthenticationError):
            wrapped.unwrap(kek, v1_header + v15)
        from cryptography.hazmat.primitives import hashes
        from zodbkmi.kek import _PSS
        signature = kek._private.sign(parsed.header + v15, _PSS,
                                      hashes.SHA256())
        with self.assertRaises(exceptions.AuthenticationError):
            wrapped.unwrap(kek, parsed.header + v15 + signature)

    def test_rsa_kek_at_least_3072_bits(self):
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import rsa
        weak = rsa.generate_private_key(65537, 2048).private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption())
        with self.assertRaises(exceptions.InvalidKeyError):
            self.facility.create_key(weak)

    def test_decryption_errors_never_return_input(self):
        # a decryption failure must raise, never hand back its input
        data = self.facility.encrypt(self.kek, b'secret')
        for bad in (b'', b'plain', data[:-1], data[:34], b'.km' + data[3:20],
                    data[:5] + b'\x01' + data[6:]):
            with self.assertRaises(exceptions.ZodbKmiError):
                self.facility.decrypt(self.kek, bad)

    def test_unmarked_data_is_not_accepted_as_plaintext(self):
        for plain in (b'(dp0\n.', b'\x80\x03}q\x00.', b'zk', b'.z'):
            with self.assertRaises(exceptions.DecryptionError):
                self.facility.decrypt(self.kek, plain)

    def test_no_key_material_in_repr_or_messages(self):
        from zodbkmi.kek import as_kek
        from zodbkmi.keyholder import KeyHolder
        from zodbkmi.keyholder import write_key_file
        kek = as_kek(self.kek)
        entry = self.facility._decryption_entry(
            kek, bytes.fromhex(self.dek_id))
        dek = entry._dek
        path = os.path.join(self.tmp, 'kek.pem')
        write_key_file(path, self.kek)
        texts = [repr(kek), repr(self.facility), repr(entry),
                 repr(entry.sealer), repr(KeyHolder(path)),
                 repr(self.facility.entry(self.dek_id))]
        try:
            self.facility.decrypt(os.urandom(32), self.facility.encrypt(
                self.kek, b'x'))
        except exceptions.ZodbKmiError as e:
            texts.append(str(e))
        pem_body = b''.join(self.kek.splitlines()[1:-1]).decode()
        for text in texts:
            self.assertNotIn(dek.hex(), text)
            self.assertNotIn(pem_body[:40], text)
            self.assertNotIn('PRIVATE', text)
