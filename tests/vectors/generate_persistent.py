"""Generate tests/vectors/persistent-state.json (run once; never change a
released vector): python tests/vectors/generate_persistent.py"""
import json
import os
import pickle

from zodbkmi.format.envelope import Sealer
from zodbkmi.testing import _TESTING_DEK
from zodbkmi.testing import TESTING_DEK_ID

HERE = os.path.dirname(os.path.abspath(__file__))


def ref_pickle(state, nrefs):
    """The plaintext of a state whose references are _ref(i) calls."""

    class Ref:
        def __init__(self, i):
            self.i = i

        def __reduce__(self):
            from zodbkmi.persistent import _ref
            return _ref, (self.i,)
    refs = [Ref(i) for i in range(nrefs)]
    state = {k: (refs[v[1]] if isinstance(v, tuple) else v)
             for k, v in state.items()}
    data = pickle.dumps(state, 3)
    if nrefs:
        data += pickle.dumps(nrefs, 3)
    return data


def vector(name, comment, state, nrefs, nonce, plaintext=None, **extra):
    plaintext = plaintext if plaintext is not None else ref_pickle(
        state, nrefs)
    envelope = Sealer(TESTING_DEK_ID, _TESTING_DEK).seal(
        plaintext, _nonce=bytes.fromhex(nonce))
    v = {'name': name, 'comment': comment,
         'state': {k: (['ref', v[1]] if isinstance(v, tuple) else v)
                   for k, v in state.items()},
         'references': nrefs, 'nonce': nonce,
         'plaintext': plaintext.hex(), 'envelope': envelope.hex()}
    v.update(extra)
    return v


def main():
    doc = {
        'format': 'zodbkmi EncryptedPersistent state, version 1',
        'specification': 'docs/persistent.rst, "What is stored"',
        'generated_by': 'tests/vectors/generate_persistent.py',
        'comment': 'Envelopes under the public testing DEK of '
                   'zodbkmi.testing (data context).  The stored state is '
                   'the envelope alone when "references" is 0, else a '
                   'tuple of the envelope and that many references; in '
                   '"state", ["ref", i] stands for reference i.  Invalid '
                   'vectors raise the zodbkmi.exceptions class in "error" '
                   'when loaded with "references" references.  Hex values.',
        'valid': [
            vector('no-references', 'a name and a secret: one envelope',
                   {'name': 'alice', 'ssn': '123456789'}, 0,
                   '000102030405060708090a0b'),
            vector('references', 'two references, one used twice',
                   {'friend': ('ref', 0), 'parent': ('ref', 1),
                    'again': ('ref', 0), 'n': 7}, 2,
                   '0c0d0e0f1011121314151617'),
        ],
        'invalid': [
            vector('future-format', 'plaintext is not a protocol 3 pickle',
                   {}, 0, '18191a1b1c1d1e1f20212223',
                   plaintext=b'\x01future', error='UnsupportedFormatError'),
            vector('reference-count', 'two references written, one stored',
                   {'a': ('ref', 0), 'b': ('ref', 1)}, 2,
                   '2425262728292a2b2c2d2e2f', error='AuthenticationError',
                   stored_references=1),
        ],
    }
    with open(os.path.join(HERE, 'persistent-state.json'), 'w') as f:
        json.dump(doc, f, indent=1)
        f.write('\n')


if __name__ == '__main__':
    main()
