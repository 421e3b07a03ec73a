"""The progress display of ``zodbkmi migrate``: a bar, or one line a chunk."""
import sys
import time

from zope.interface import implementer

from zodbkmi.migrate.interfaces import IMigrationProgress


@implementer(IMigrationProgress)
class Progress:
    """A progress line with rate and ETA, redrawn in place on a terminal.

    Off a terminal nothing is drawn unless ``verbose``, then one line per
    chunk is printed (what tests and logs read).
    """

    def __init__(self, total, stream=None, verbose=False, tty=None,
                 width=30):
        self.total = max(total or 0, 0)
        self.stream = sys.stderr if stream is None else stream
        self.tty = (getattr(self.stream, 'isatty', lambda: False)()
                    if tty is None else tty)
        self.verbose = verbose
        self.width = width
        self.start = time.monotonic()
        self.done = 0
        self._drawn = 0.0

    def line(self, done):
        elapsed = max(time.monotonic() - self.start, 1e-9)
        rate = done / elapsed
        if self.total and done <= self.total:
            frac = done / self.total
            filled = int(frac * self.width)
            bar = '#' * filled + '-' * (self.width - filled)
            eta = (self.total - done) / rate if rate else 0
            return '[%s] %d/%d %5.1f%% %.0f rec/s ETA %s' % (
                bar, done, self.total, frac * 100, rate, _hms(eta))
        return '%d records %.0f rec/s' % (done, rate)

    def update(self, done, chunk=None, rewritten=None):
        self.done = done
        if self.tty:
            now = time.monotonic()
            if now - self._drawn >= 0.2 or done >= self.total:
                self._drawn = now
                self.stream.write('\r' + self.line(done))
                self.stream.flush()
        if self.verbose:
            if self.tty:
                self.stream.write('\n')
            self.stream.write('chunk %d: %d records seen, %d rewritten\n'
                              % (chunk, done, rewritten))
            self.stream.flush()

    def finish(self):
        if self.tty:
            self.stream.write('\r' + self.line(self.done) + '\n')
            self.stream.flush()


def _hms(seconds):
    seconds = int(seconds)
    return '%d:%02d:%02d' % (seconds // 3600, seconds // 60 % 60,
                             seconds % 60)
