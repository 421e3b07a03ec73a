"""Threads of zodbkmi that never take a signal from the main thread.

A signal sent to the process (Ctrl-C, SIGTERM) goes to any thread that
does not block it.  Python runs its handler in the main thread, but a
system call the main thread waits in (a blocking read of standard input)
is interrupted only when the kernel gave the signal to that thread: given
to another one, it would leave the main thread waiting, the Ctrl-C
unnoticed.  So zodbkmi's own threads block every signal from their first
instruction: they are started while the starting thread blocks them
(a new thread inherits the mask), which leaves no window in which the
kernel could choose them.  The starting thread's mask is restored at
once; a signal that came meanwhile is delivered to it then.
"""
import signal
import threading


def start(thread):
    """Start ``thread`` (a ``threading.Thread``) with every signal
    blocked in it."""
    if not hasattr(signal, 'pthread_sigmask'):      # pragma: no cover
        thread.start()
        return thread
    old = signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
    try:
        thread.start()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
    return thread


def spawn(target, name=None):
    """A daemon thread running ``target``, started as :func:`start`
    does."""
    return start(threading.Thread(target=target, name=name, daemon=True))
