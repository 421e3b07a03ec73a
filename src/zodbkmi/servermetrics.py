"""The key server's metrics, in the Prometheus text format (``/v1/metrics``).

Served by the key server behind a token of the ``metrics`` role (or an
admin token).  The series::

    zodbkmi_server_requests_total{route, method, status}     counter
    zodbkmi_server_request_duration_seconds{route}           histogram
    zodbkmi_server_key_store_duration_seconds{operation}     histogram
    zodbkmi_server_keys{state}                               gauge, at scrape
    zodbkmi_server_audit_write_failures_total                counter

With ``workers`` > 1 each request is counted by the worker process that
served it; ``zodbkmi serve`` then points ``PROMETHEUS_MULTIPROC_DIR`` at
a fresh directory before the workers start, and a scrape (answered by
any worker) adds up the files of all of them (``prometheus_client``'s
multiprocess mode), so the numbers are those of the whole server.  The
number of keys is read from the key store at each scrape.
"""
import os
import time

from zope.interface import directlyProvides
from zope.interface import providedBy

#: The key store methods timed, by operation label.
TIMED = ('add', 'get', 'update', 'remove', 'ids', 'entries', 'active_for',
         'rotate')
_BUCKETS = (.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5,
            5, 10)


def _prometheus():
    try:
        import prometheus_client
    except ImportError:   # pragma: no cover
        from zodbkmi.exceptions import SettingsError
        raise SettingsError('metrics need prometheus_client: pip install '
                            '"zodbkmi[server]"') from None
    return prometheus_client


class TimedKeyStore:
    """A key store whose :data:`TIMED` methods feed a histogram; every
    other attribute is the wrapped store's (``path``, ``check``,
    ``sweep``), and it provides the same interfaces."""

    def __init__(self, store, histogram):
        self.store = store
        for name in TIMED:
            method = getattr(store, name, None)
            if method is not None:
                setattr(self, name, self._timed(
                    method, histogram.labels(operation=name)))
        directlyProvides(self, providedBy(store))

    @staticmethod
    def _timed(method, child):
        def timed(*args, **kw):
            start = time.perf_counter()
            try:
                return method(*args, **kw)
            finally:
                child.observe(time.perf_counter() - start)
        timed.__name__ = method.__name__
        timed.__doc__ = method.__doc__
        return timed

    def __getattr__(self, name):
        return getattr(self.store, name)

    def __repr__(self):
        return '<TimedKeyStore %r>' % (self.store,)


class ServerMetrics:
    """The metrics of one key server process, in a registry of its own
    (so that several apps in one process, as in tests, do not collide)."""

    def __init__(self):
        pc = _prometheus()
        self._pc = pc
        self.registry = pc.CollectorRegistry(auto_describe=True)
        self.multiprocess = bool(os.environ.get('PROMETHEUS_MULTIPROC_DIR'))
        kw = {'registry': self.registry}
        self.requests = pc.Counter(
            'zodbkmi_server_requests', 'Requests answered, by route, method '
            'and status', ('route', 'method', 'status'), **kw)
        self.latency = pc.Histogram(
            'zodbkmi_server_request_duration_seconds', 'Time to answer a '
            'request, by route', ('route',), buckets=_BUCKETS, **kw)
        self.store_latency = pc.Histogram(
            'zodbkmi_server_key_store_duration_seconds', 'Time of key store '
            'operations, by operation', ('operation',), buckets=_BUCKETS,
            **kw)
        self.audit_failures = pc.Counter(
            'zodbkmi_server_audit_write_failures', 'Audit lines that could '
            'not be written (each failed its request)', **kw)

    def instrument(self, store):
        """``store`` with its operations timed."""
        return TimedKeyStore(store, self.store_latency)

    def audit_failed(self):
        self.audit_failures.inc()

    def observe(self, app, environ, start_response):
        """Call the WSGI ``app`` and count its answer."""
        start = time.perf_counter()
        seen = []

        def recording(status, headers, exc_info=None):
            seen.append(status.split(' ', 1)[0])
            return start_response(status, headers, exc_info)
        result = app(environ, recording)
        route = environ.get('zodbkmi.route', 'unmatched')
        method = environ.get('REQUEST_METHOD', 'GET')
        if method not in ('GET', 'POST', 'PUT', 'DELETE'):
            method = 'other'    # bounded label values
        self.requests.labels(route, method, seen[0] if seen else '500').inc()
        self.latency.labels(route).observe(time.perf_counter() - start)
        return result

    def exposition(self, store):
        """``(body, content type)`` of a scrape; the number of keys is read
        from ``store`` now."""
        pc = self._pc
        registry = self.registry
        if self.multiprocess:
            from prometheus_client import multiprocess
            registry = pc.CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
        keys = pc.CollectorRegistry()
        keys.register(_KeysCollector(store))
        body = pc.generate_latest(registry) + pc.generate_latest(keys)
        return body, pc.CONTENT_TYPE_LATEST


class _KeysCollector:
    def __init__(self, store):
        self.store = store

    def describe(self):
        return []

    def collect(self):
        from prometheus_client.core import GaugeMetricFamily
        from zodbkmi.keystore import STATES
        counts = getattr(self.store, 'count_by_state', None)
        if counts is not None:
            found = counts()
        else:
            found = {}
            for entry in self.store.entries():
                found[entry.state] = found.get(entry.state, 0) + 1
        family = GaugeMetricFamily('zodbkmi_server_keys',
                                   'Keys in the key store, by state',
                                   labels=('state',))
        for state in STATES:
            family.add_metric((state,), found.get(state, 0))
        yield family
