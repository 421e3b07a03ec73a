"""A bounded load test of the real key server: ``benchmarks/load_server.py``
run for 60 seconds with 16 client threads against ``zodbkmi serve`` (2
workers, TLS) on 127.0.0.1.

What must hold (correctness, not speed; the figures are printed): no 5xx
answer, neither seen by a client nor in the server's access log; no
traceback nor error line in the server's log; no wrong answer (every fetched
wrapped DEK byte for byte what was uploaded, every malformed request a 4xx
with a short body, or no answer for a request the client cut off itself);
every key the vault files hold matches what was uploaded; the server still
healthy and stopping cleanly; and its memory stable: the resident memory of
the server's process tree at the end at most max(20 MiB, 25 %) above its
value after the warm-up (the first 10 seconds).
"""
import importlib.util
import io
import os
import sys
import unittest

from tests.test_docs import TOP

SECONDS = 60
CLIENTS = 16
#: Allowed RSS growth after warm-up: the larger of these.
RSS_GROWTH_BYTES = 20 * 1024 * 1024
RSS_GROWTH_RATIO = 0.25


def load_script():
    path = os.path.join(TOP, 'benchmarks', 'load_server.py')
    spec = importlib.util.spec_from_file_location('zodbkmi_load_server', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class LoadTests(unittest.TestCase):

    def test_sixty_seconds_sixteen_clients(self):
        script = load_script()
        out = io.StringIO()
        r = script.run(seconds=SECONDS, clients=CLIENTS, out=out)
        sys.stdout.write('\n' + out.getvalue())
        self.assertEqual((r['client_5xx'], r['logged_5xx'], r['tracebacks']),
                         (0, 0, 0))
        self.assertEqual(r['log_errors'], 0, r['log_error_examples'])
        self.assertEqual(r['wrong'], 0, r['wrong_examples'])
        self.assertEqual(r['connection_errors'], 0)
        self.assertEqual(r['vault_mismatches'], 0)
        self.assertTrue(r['healthy_after'])
        self.assertEqual(r['exit_code'], 0)
        # every class of request was sent and answered as it should be
        for name, expected in script.EXPECTED.items():
            got = r['by_class'][name]
            self.assertTrue(got, name)
            self.assertLessEqual(set(got), expected, name)
        for name in script.VALID:
            self.assertTrue(r['by_class'][name], name)
        self.assertGreater(r['vault_keys'], 50)   # keys were created
        self.assertGreater(r['logged_requests'], r['requests'] // 2)
        bound = max(RSS_GROWTH_BYTES, RSS_GROWTH_RATIO * r['rss_warm'])
        self.assertLess(r['rss_end'] - r['rss_warm'], bound,
                        'server memory grew under load')
