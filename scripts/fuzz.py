"""Coverage-guided fuzzing (atheris) of zodbkmi's parsers.

Usage::

    python scripts/fuzz.py TARGET [libFuzzer options]
    python scripts/fuzz.py envelope -max_total_time=3600     # a long run
    python scripts/fuzz.py all -atheris_runs=20000          # every target

Targets: envelope (header parsing and opening), wrapped (wrapped DEK parsing
and unwrapping), vault (vault entry documents), stream (stream header
parsing and chunk opening), rest (requests to the key server's WSGI
application: every answer must be a 4xx or 2xx with a JSON body, never a
5xx), legacy (keas.kmi and cipher.encryptingstorage ciphertext read by
migrations), all.  A target fails (and
libFuzzer writes a crash-* file) when a parser returns bytes it should not
have accepted or raises anything but its documented exceptions.  The test
suite runs every target briefly (tests/test_fuzz.py); longer runs are for
this script.
"""
import sys

import atheris

# the libraries are imported (not instrumented) first: the parsers are
# ours, and instrumenting ZODB, zope.* and cryptography's Python parts at
# every start tripled the time a short run takes
import cryptography.hazmat.primitives.ciphers.aead  # noqa: E402,F401
import ZODB.DB  # noqa: E402,F401
import zope.component  # noqa: E402,F401

with atheris.instrument_imports():
    from zodbkmi import exceptions
    from zodbkmi.format import envelope
    from zodbkmi.format import stream
    from zodbkmi.format import wrapped
    from zodbkmi.kek import AESKeyEncryptingKey
    from zodbkmi.keystore import KeyStoreEntry
    from zodbkmi import legacy
    from zodbkmi import rest

DEK_ID = bytes(range(16))
DEK = bytes(range(32, 64))
SEALER = envelope.Sealer(DEK_ID, DEK)
KEK = AESKeyEncryptingKey(bytes(32))
PARSE = (exceptions.UnsupportedFormatError, exceptions.TruncatedDataError)


def fuzz_envelope(data):
    fdp = atheris.FuzzedDataProvider(data)
    # data, storage record or object state
    context = fdp.ConsumeIntInRange(0, 2)
    record = context == envelope.CONTEXT_RECORD
    oid = fdp.ConsumeBytes(8) if record else None
    if record and len(oid) != 8:
        return
    body = fdp.ConsumeBytes(fdp.remaining_bytes())
    if body[:1] in (b'\x00', b'\x01'):
        # start from a genuine envelope (version 2; version 1 through the
        # vectors' seam) and let the fuzzer's bytes overwrite a window of
        # it (first byte after the marker: where)
        if body[:1] == b'\x01' and context != envelope.CONTEXT_STATE:
            sealed = SEALER.seal(body[1:9], context, oid, _nonce=bytes(12))
        else:
            sealed = SEALER.seal(body[1:9], context, oid)
        sealed = bytearray(sealed)
        patch = body[9:]
        if patch:
            start = patch[0] % len(sealed)
            sealed[start:start + len(patch) - 1] = patch[1:]
        body = bytes(sealed)
    try:
        raw_id = envelope.read_dek_id(body, context)
        if raw_id != DEK_ID:
            return
        plaintext = SEALER.open(body, context, oid)
    except PARSE + (exceptions.AuthenticationError,):
        return
    # only a genuine envelope opens: sealing again must reproduce it
    if envelope.version_of(body) == envelope.VERSION_2:
        salt, nonce = body[22:26], body[26:38]
    else:
        salt, nonce = None, body[22:34]
    assert SEALER.seal(plaintext, body[5], oid, _nonce=nonce,
                       _salt=salt) == body


def fuzz_wrapped(data):
    try:
        parsed = wrapped.parse(data)
    except PARSE:
        return
    assert parsed.header + parsed.blob == data
    try:
        dek_id, dek = wrapped.unwrap(KEK, data)
    except PARSE + (exceptions.AuthenticationError,):
        return
    assert len(dek) == 32 and dek_id == parsed.dek_id


def fuzz_vault(data):
    try:
        KeyStoreEntry.from_json(data)
    except exceptions.KeyStoreError:
        return


def fuzz_stream(data):
    import io
    body = data
    if body[:1] == b'\x00':
        # a genuine stream of 64 byte chunks, a window overwritten by the
        # fuzzer's bytes (second byte: where)
        sealed = bytearray(stream.encrypt_bytes(
            DEK_ID, DEK, body[2:200], 64, _salt=bytes(16)))
        patch = body[200:]
        if len(body) > 1 and patch:
            start = body[1] * len(sealed) // 256
            sealed[start:start + len(patch)] = patch
        body = bytes(sealed)
    src = io.BytesIO(body)
    try:
        header = stream.read_header(src)
    except PARSE:
        return
    assert header.raw == body[:header.size]
    if header.wrapped is not None:
        try:
            _, dek = wrapped.unwrap(KEK, header.wrapped)
        except PARSE + (exceptions.AuthenticationError,):
            return
    elif header.dek_id == DEK_ID:
        dek = DEK
    else:
        return
    out = io.BytesIO()
    try:
        n = stream.decrypt(src, out, dek, header)
    except PARSE + (exceptions.AuthenticationError,):
        # whatever was written is whole chunks of a genuine stream
        assert len(out.getvalue()) % header.chunk_size == 0
        return
    # only a genuine stream opens: encrypting again reproduces it
    assert n == len(out.getvalue())
    again = io.BytesIO()
    stream.encrypt(io.BytesIO(out.getvalue()), again, dek, header)
    assert again.getvalue() == body


_REST = {}
_TOKENS = ['admin-token', 'client-token', 'wrong']


def _rest_app():
    if not _REST:
        import atexit
        import json
        import shutil
        import tempfile

        from zodbkmi.facility import KeyManagementFacility
        tmp = tempfile.mkdtemp(prefix='zodbkmi-fuzz-')
        atexit.register(shutil.rmtree, tmp, True)
        facility = KeyManagementFacility(tmp)
        facility.create_key(KEK)
        tokens = rest.TokenTable([
            ('a', 'admin', rest.hash_token(_TOKENS[0])),
            ('c', 'client', rest.hash_token(_TOKENS[1]))])
        _REST['app'] = rest.KeyServerApp(facility, tokens, max_body=4096)
        _REST['transport'] = rest.WSGITransport(_REST['app'])
        _REST['json'] = json
        _REST['dek_id'] = facility.keys()[0]
    return _REST


def fuzz_rest(data):
    r = _rest_app()
    fdp = atheris.FuzzedDataProvider(data)
    method = fdp.PickValueInList(['GET', 'POST', 'DELETE', 'PUT', 'HEAD'])
    path = fdp.PickValueInList([
        '/v1/keys', '/v1/keys/' + r['dek_id'],
        '/v1/keys/%s/retire' % r['dek_id'], '/v1/status', '/v1/health',
        '/v1/keks/%s/active' % KEK.key_id, '/v1/keys/',
        fdp.ConsumeUnicodeNoSurrogates(60)])
    headers = {'Authorization': 'Bearer ' + fdp.PickValueInList(_TOKENS),
               'Content-Type': fdp.PickValueInList(
                   ['application/json', 'text/plain',
                    'application/json; charset=utf-8', ''])}
    body = fdp.ConsumeBytes(fdp.remaining_bytes())
    if method == 'DELETE':
        method = 'GET'   # keep the key; deletion is covered by the tests
    status, answer = r['transport'].request(method, path, body, headers)
    assert 200 <= status < 500, status
    assert isinstance(r['json'].loads(answer), dict)


LEGACY_KEYS = None


def fuzz_legacy(data):
    global LEGACY_KEYS
    if LEGACY_KEYS is None:
        LEGACY_KEYS = legacy.KeasKMIKeys._from_dek(bytes(range(128)))
    reader = legacy.EncryptingStorageReader(LEGACY_KEYS)
    genuine = data[:1] == b'\x00'
    if genuine:
        # a genuine keas.kmi ciphertext of the fuzzer's bytes
        encryptor = LEGACY_KEYS._cipher.encryptor()
        body = data[1:]
        n = 16 - len(body) % 16
        data = encryptor.update(body + bytes([n]) * n) + \
            encryptor.finalize()
        assert LEGACY_KEYS.decrypt(data) == body
    try:
        reader.decrypt_record(b'.e' + data)
    except exceptions.DecryptionError:
        pass
    if genuine:
        # never unpickle what the fuzzer chose: a pickle can call anything
        return
    try:
        legacy.decrypt_keas_state(LEGACY_KEYS, (data, []))
    except exceptions.DecryptionError:
        pass


TARGETS = {'envelope': fuzz_envelope, 'wrapped': fuzz_wrapped,
           'vault': fuzz_vault, 'stream': fuzz_stream, 'rest': fuzz_rest,
           'legacy': fuzz_legacy}


def main(argv=None):
    argv = list(sys.argv if argv is None else argv)
    if len(argv) < 2 or argv[1] not in list(TARGETS) + ['all']:
        print(__doc__, file=sys.stderr)
        return 2
    name = argv.pop(1)
    if name == 'all':
        import subprocess
        rc = 0
        for target in TARGETS:
            rc |= subprocess.call([sys.executable, argv[0], target]
                                  + argv[1:])
        return rc
    atheris.Setup(argv, TARGETS[name])
    atheris.Fuzz()


if __name__ == '__main__':
    sys.exit(main())
