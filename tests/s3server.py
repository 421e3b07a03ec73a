"""An S3-compatible object store on a loopback port, as a test layer.

``S3Layer`` starts moto's standalone server (``python -m moto.server``,
from the ``moto[server]`` package) as a subprocess listening on 127.0.0.1
only, and ends it (by its process id) in tearDown.  The store lives in the
server's memory: nothing of it is written to disk.  ``S3Layer.server`` is
the :class:`MotoServer` (None when moto or zodb-s3blobs is not installed).
"""
import os
import socket
import subprocess
import sys
import tempfile
import time
import unittest
import uuid

from zodbkmi.testing import free_port

#: Credentials moto accepts (any are); never real ones.
ACCESS_KEY = 'testing-access-key'
SECRET_KEY = 'testing-secret-key'
REGION = 'us-east-1'


def missing():
    """The reason the S3 tests cannot run here, or None."""
    for module, package in (('moto.server', 'moto[server]'),
                            ('boto3', 'boto3'),
                            ('zodb_s3blobs', 'zodb-s3blobs')):
        try:
            __import__(module)
        except ImportError:
            return '%s is not installed' % package
    return None


class MotoServer:
    """``moto.server`` as a subprocess on a free loopback port."""

    def __init__(self, port=None, timeout=30):
        self.port = port or free_port()
        self.endpoint = 'http://127.0.0.1:%d' % self.port
        self.dir = tempfile.mkdtemp(prefix='zodbkmi-s3-')
        self.log = os.path.join(self.dir, 'moto.log')
        self.timeout = timeout
        self.proc = None

    def start(self):
        with open(self.log, 'ab') as log:
            self.proc = subprocess.Popen(
                [sys.executable, '-m', 'moto.server', '-H', '127.0.0.1',
                 '-p', str(self.port)],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                cwd=self.dir)
        deadline = time.monotonic() + self.timeout
        while True:
            if self.proc.poll() is not None:
                with open(self.log, errors='replace') as f:
                    raise RuntimeError('moto server exited: ' + f.read())
            try:
                socket.create_connection(('127.0.0.1', self.port), 1).close()
                return self
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError('moto server did not start')
                time.sleep(0.05)

    def client(self):
        """A boto3 S3 client of the server."""
        import boto3
        return boto3.client(
            's3', endpoint_url=self.endpoint, region_name=REGION,
            aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY)

    def create_bucket(self, name=None):
        """Make a new, empty bucket; return its name."""
        name = name or 'zodbkmi-' + uuid.uuid4().hex[:16]
        self.client().create_bucket(Bucket=name)
        return name

    def objects(self, bucket):
        """``{key: bytes}`` of every object in ``bucket``."""
        client = self.client()
        found = {}
        pages = client.get_paginator('list_objects_v2').paginate(
            Bucket=bucket)
        for page in pages:
            for entry in page.get('Contents', []):
                body = client.get_object(Bucket=bucket, Key=entry['Key'])
                found[entry['Key']] = body['Body'].read()
        return found

    def stop(self):
        try:
            if self.proc is not None and self.proc.poll() is None:
                self.proc.terminate()
                try:
                    self.proc.wait(10)
                except subprocess.TimeoutExpired:   # pragma: no cover
                    self.proc.kill()
                    self.proc.wait(10)
        finally:
            self.proc = None
            for name in os.listdir(self.dir):
                os.remove(os.path.join(self.dir, name))
            os.rmdir(self.dir)


class S3Layer:
    """Starts one moto server for the tests of the layer."""

    __name__ = 'S3Layer'
    __module__ = __name__
    server = None

    @classmethod
    def setUp(cls):
        if missing() is not None:
            return
        cls.server = MotoServer().start()

    @classmethod
    def tearDown(cls):
        if cls.server is not None:
            cls.server.stop()
            cls.server = None


def needs_s3(test=None):
    reason = missing()
    if reason is not None or S3Layer.server is None:
        raise unittest.SkipTest(reason or 'the S3 server is not running')
