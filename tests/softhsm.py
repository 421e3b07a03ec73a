"""Test fixture: a real SoftHSM2 token, initialised in a temporary directory.

Debian's ``softhsm2`` package (tests/debian-packages.txt) provides
``softhsm2-util`` and the PKCS#11 module.  SOFTHSM2_CONF is set before the
module is loaded and the token is initialised before that, as SoftHSM
needs.  When SoftHSM2 is missing the layer fails loudly, unless
``ZODBKMI_SKIP_SOFTHSM=1`` is set, in which case its tests are skipped.
"""
import os
import shutil
import subprocess
import tempfile
import unittest

LIBRARY = '/usr/lib/softhsm/libsofthsm2.so'
TOKEN_LABEL = 'zodbkmi-test'
SO_PIN = '12345678'
PIN = '4321'
KEY_LABEL = 'kek-1'
SKIP_ENV = 'ZODBKMI_SKIP_SOFTHSM'


def skip_requested():
    return os.environ.get(SKIP_ENV) == '1'


class SoftHSM:
    """A SoftHSM2 configuration with one initialised token."""

    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix='zodbkmi-softhsm-')
        self.conf = os.path.join(self.dir, 'softhsm2.conf')
        self.library = LIBRARY
        self.token_label = TOKEN_LABEL
        self.pin = PIN
        self._old_conf = None

    def start(self):
        if not os.path.exists(LIBRARY) or not shutil.which('softhsm2-util'):
            raise RuntimeError('SoftHSM2 is not installed (apt-get install '
                               'softhsm2, or set %s=1 to skip)' % SKIP_ENV)
        tokens = os.path.join(self.dir, 'tokens')
        os.mkdir(tokens, 0o700)
        with open(self.conf, 'w') as f:
            f.write('directories.tokendir = %s\nobjectstore.backend = file\n'
                    'log.level = ERROR\nslots.removable = false\n' % tokens)
        self._old_conf = os.environ.get('SOFTHSM2_CONF')
        os.environ['SOFTHSM2_CONF'] = self.conf
        subprocess.run(
            ['softhsm2-util', '--init-token', '--free', '--label',
             TOKEN_LABEL, '--so-pin', SO_PIN, '--pin', PIN],
            check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        import pkcs11
        lib = pkcs11.lib(LIBRARY)
        # Loaded earlier in this process (another layer run)?  Then make it
        # read the new configuration and token.
        lib.reinitialize()
        return self

    def pin_file(self, directory):
        path = os.path.join(directory, 'pin')
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, 'w') as f:
            f.write(PIN + '\n')
        return path

    def stop(self):
        if self._old_conf is None:
            os.environ.pop('SOFTHSM2_CONF', None)
        else:   # pragma: no cover
            os.environ['SOFTHSM2_CONF'] = self._old_conf
        shutil.rmtree(self.dir, ignore_errors=True)


class SoftHSMLayer:
    """One SoftHSM2 token (``hsm``) holding the AES key ``kek-1``."""

    hsm = None

    @classmethod
    def setUp(cls):
        if skip_requested():
            return
        from zodbkmi.sources.pkcs11 import create_key
        cls.hsm = SoftHSM().start()
        create_key(LIBRARY, TOKEN_LABEL, KEY_LABEL, PIN)

    @classmethod
    def tearDown(cls):
        if cls.hsm is not None:
            cls.hsm.stop()
            cls.hsm = None


class SoftHSMTestCase(unittest.TestCase):
    """Base class of tests using :class:`SoftHSMLayer`."""

    layer = SoftHSMLayer

    def setUp(self):
        if skip_requested():
            self.skipTest('%s=1' % SKIP_ENV)
        self.hsm = SoftHSMLayer.hsm
