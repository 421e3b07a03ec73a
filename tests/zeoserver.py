"""A real ZEO server (``runzeo``) started from a zeo.conf, for tests.

The configuration is written as a deployment would write it (docs/
storage.rst shows the same files); the server runs as a subprocess on a
free loopback port and logs to a file in its directory.
"""
import os
import socket
import subprocess
import sys
import time

from zodbkmi.testing import child_environ
from zodbkmi.testing import free_port

#: The ``<zeo>`` section of a server that lets its clients resolve
#: conflicts (ZEO >= 5): the recommended keyless server (docs/storage.rst).
KEYLESS_ZEO = '''\
<zeo>
  address 127.0.0.1:%(port)d
  client-conflict-resolution true
</zeo>
'''

PLAIN_ZEO = '''\
<zeo>
  address 127.0.0.1:%(port)d
</zeo>
'''

#: The storage of a keyless server: ciphertext only; pack without
#: garbage collection (it would need to read references).
KEYLESS_STORAGE = '''\
<filestorage>
  path %(directory)s/Data.fs
  blob-dir %(directory)s/blobs
  pack-gc false
</filestorage>
'''


class ZEOServer:
    """``runzeo -C zeo.conf`` in ``directory``; ``zeo`` and ``storage``
    are the two parts of zeo.conf, formatted with ``port`` and
    ``directory``."""

    def __init__(self, directory, zeo=KEYLESS_ZEO, storage=KEYLESS_STORAGE,
                 env=None):
        self.directory = directory
        os.makedirs(directory, exist_ok=True)
        self.port = free_port()
        self.addr = ('127.0.0.1', self.port)
        values = dict(port=self.port, directory=directory)
        self.conf = os.path.join(directory, 'zeo.conf')
        with open(self.conf, 'w') as f:
            f.write((zeo % values) + '\n' + (storage % values))
        self._log = open(os.path.join(directory, 'zeo.log'), 'wb')
        # the server imports zodbkmi (<serverencryptingstorage>) from the
        # same place as the tests; runzeo's module, as its script is not
        # there under zc.buildout
        environ = child_environ(env)
        self.process = subprocess.Popen(
            [sys.executable, '-m', 'ZEO.runzeo', '-C', self.conf],
            stdout=self._log,
            stderr=subprocess.STDOUT, cwd=directory, env=environ)
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(self.addr, 1).close()
                return
            except OSError:
                if time.monotonic() > deadline or \
                        self.process.poll() is not None:
                    self.stop()
                    raise RuntimeError('ZEO did not start: %s'
                                       % self.log_text()[-2000:])
                time.sleep(0.05)

    def log_text(self):
        self._log.flush()
        with open(os.path.join(self.directory, 'zeo.log'), 'rb') as f:
            return f.read().decode('utf-8', 'replace')

    def stop(self):
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:   # pragma: no cover
                self.process.kill()
                self.process.wait()
        self._log.close()
