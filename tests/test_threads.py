"""zodbkmi's threads block every signal from their start (zodbkmi.threads).

A signal the kernel gave one of them would not interrupt the system call
the main thread waits in: ``zodbkmi decrypt-file`` reading a pipe ignored
Ctrl-C when the key cache's reaper thread had just been started and had
not yet blocked signals itself (``tests/test_cli_files.py``,
``test_interrupted_decrypt_leaves_no_output``, hung on loaded machines).
"""
import os
import signal
import threading
import unittest

from zodbkmi import threads


def blocked_signals(native_id):
    with open('/proc/self/task/%d/status' % native_id) as f:
        for line in f:
            if line.startswith('SigBlk:'):
                return int(line.split()[1], 16)
    raise AssertionError('no SigBlk line')


@unittest.skipUnless(os.path.exists('/proc/self/task')
                     and hasattr(signal, 'pthread_sigmask'), 'Linux /proc')
class ThreadSignalTests(unittest.TestCase):

    def test_signals_blocked_before_the_target_runs(self):
        go = threading.Event()
        # the target does nothing about signals: the mask is the one the
        # thread was created with
        thread = threads.spawn(lambda: go.wait(60), name='test')
        try:
            mask = blocked_signals(thread.native_id)
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                self.assertTrue(mask & (1 << (sig - 1)), sig)
        finally:
            go.set()
            thread.join(60)
        # the starting thread keeps its own mask
        self.assertNotIn(signal.SIGINT,
                         signal.pthread_sigmask(signal.SIG_BLOCK, []))

    def test_a_plain_thread_would_take_signals(self):
        # the control: without zodbkmi.threads the new thread can take
        # SIGINT until it blocks it itself
        go = threading.Event()
        thread = threading.Thread(target=lambda: go.wait(60), daemon=True)
        thread.start()
        try:
            mask = blocked_signals(thread.native_id)
            self.assertFalse(mask & (1 << (signal.SIGINT - 1)))
        finally:
            go.set()
            thread.join(60)
