"""Shared fixtures: a temp-file database, the app under webtest, the CLI, a live server."""
import base64
import http.client
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.parse

import pytest
from click.testing import CliRunner
from webtest import TestApp

import cli
import models
import xhs_server

HERE = os.path.dirname(os.path.abspath(__file__))
SAMPLES = os.path.join(HERE, 'samples')

PHONE_A = {'imsi': '460011234567801', 'iccid': '89860112345678901201'}
PHONE_B = {'imsi': '460011234567802', 'iccid': '89860112345678901202'}


def sample(name, mode='rb'):
    with open(os.path.join(SAMPLES, name), mode) as handle:
        return handle.read()


PNG_START, PNG_END = b'\x89PNG\r\n\x1a\n', b'\x00\x00\x00\x00IEND\xaeB`\x82'


def png_like(filler):
    """Bytes that begin and end as a PNG does (what the server checks), around `filler`."""
    return PNG_START + filler + PNG_END


def b64(name):
    return base64.b64encode(sample(name)).decode('ascii')


@pytest.fixture
def db_path(tmp_path):
    path = str(tmp_path / 'xhs.db')
    # In-process tests check behaviour, not durability: no fsyncs (they tripled
    # the suite's time). Live-server tests run the shipped setting.
    models.init_db(path, synchronous='off')
    xhs_server.configure()
    yield path
    models.db.close()


class Phones(TestApp):
    """webtest's TestApp with the envelope decoded; every answer must be HTTP 200 JSON."""

    def call(self, path, params=None, method='GET', encoding='query', **kwargs):
        params = dict(params or {})
        if encoding == 'query' or method == 'GET':
            query = urllib.parse.urlencode(params)
            res = self.request(path + ('?' + query if query else ''), method=method, **kwargs)
        elif encoding == 'form':
            res = self.post(path, urllib.parse.urlencode(params),
                            content_type='application/x-www-form-urlencoded', **kwargs)
        elif encoding == 'json':
            res = self.post(path, json.dumps(params, ensure_ascii=False).encode('utf-8'),
                            content_type='application/json; charset=utf-8', **kwargs)
        elif encoding == 'text':
            res = self.post(path, json.dumps(params, ensure_ascii=False).encode('utf-8'),
                            content_type='text/plain', **kwargs)
        elif encoding == 'multipart':
            res = self.post(path, params={k: str(v) for k, v in params.items()},
                            content_type='multipart/form-data', **kwargs)
        else:
            raise ValueError(encoding)
        return envelope_of(res)

    def ok(self, path, params=None, **kwargs):
        body = self.call(path, params, **kwargs)
        assert body['code'] == 200, body
        return body


def envelope_of(res):
    assert res.status_int == 200, res
    assert res.content_type == 'application/json', res.content_type
    body = json.loads(res.body.decode('utf-8'))
    assert set(body) == {'code', 'msg', 'data', 'note'}, body
    return body


@pytest.fixture
def app(db_path):
    return Phones(xhs_server.app, extra_environ={'REMOTE_ADDR': '192.168.1.101',
                                                 'HTTP_HOST': '192.168.1.10:8000'})


@pytest.fixture
def run(db_path):
    """Run a CLI command against the test database; returns click's Result."""
    runner = CliRunner()

    def invoke(*args, input=None):
        return runner.invoke(cli.main, ['--db', db_path] + [str(a) for a in args], input=input)
    return invoke


@pytest.fixture
def ok_run(run):
    def invoke(*args, input=None):
        result = run(*args, input=input)
        assert result.exit_code == 0, (result.output, result.stderr if hasattr(result, 'stderr') else '')
        return result
    return invoke


def run_threads(count, target, timeout=300):
    """Run target(0..count-1) in threads at once; any error fails the test here."""
    errors = []

    def guarded(i):
        try:
            target(i)
        except BaseException as error:  # reported in the main thread
            errors.append(repr(error))
    threads = [threading.Thread(target=guarded, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout)
    assert not errors, errors[:3]


# --------------------------------------------------------------------------
# A real server in a subprocess
# --------------------------------------------------------------------------

def xhs_command():
    script = os.path.join(os.path.dirname(sys.executable), 'xhs-server')
    if os.path.exists(script):
        return [script]
    return [sys.executable, '-m', 'cli']


class LiveServer:
    def __init__(self, db, extra=(), env=None):
        self.db = db
        self.cmd = xhs_command() + ['--db', db, 'serve', '--host', '127.0.0.1', '--port', '0'] + list(extra)
        self.env = dict(os.environ, **(env or {}))
        self.proc = None
        self.port = None

    def start(self, wait=20):
        # stderr goes to a file: a pipe nobody reads would block a chatty server.
        self.stderr_path = self.db + '.stderr.%d' % time.monotonic_ns()
        self.stderr_file = open(self.stderr_path, 'w')
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.PIPE, stderr=self.stderr_file,
                                     env=self.env, text=True)
        deadline = time.time() + wait
        while time.time() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError('server exited: %s' % self.stderr_text())
            match = re.search(r'http://127\.0\.0\.1:(\d+)/', line)
            if match:
                self.port = int(match.group(1))
                return self
        raise RuntimeError('server did not start')

    def cli(self, *args, check=True):
        result = subprocess.run(xhs_command() + ['--db', self.db] + [str(a) for a in args],
                                capture_output=True, text=True, env=self.env)
        if check:
            assert result.returncode == 0, result.stderr
        return result

    def request(self, method, target, body=b'', headers=None, timeout=30):
        conn = http.client.HTTPConnection('127.0.0.1', self.port, timeout=timeout)
        try:
            conn.request(method, target, body=body or None, headers=headers or {})
            res = conn.getresponse()
            return res.status, res.getheader('Content-Type'), res.read()
        finally:
            conn.close()

    def call(self, path, params=None, method='POST'):
        body = urllib.parse.urlencode(params or {}).encode()
        status, ctype, data = self.request(method, path, body, {
            'Content-Type': 'application/x-www-form-urlencoded'})
        assert status == 200 and ctype.startswith('application/json'), (status, ctype, data[:200])
        return json.loads(data)

    def stderr_text(self):
        with open(self.stderr_path, encoding='utf-8', errors='replace') as handle:
            return handle.read()

    def stop(self, sig=signal.SIGTERM):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc and not self.proc.stdout.closed:
            self.proc.stdout.close()
            self.stderr_file.close()


@pytest.fixture
def live(tmp_path):
    """Start a server on a fresh database: live() or live(extra args, env)."""
    servers = []

    def start(extra=(), env=None, db=None):
        server = LiveServer(db or str(tmp_path / 'live.db'), extra, env).start()
        servers.append(server)
        return server
    yield start
    for server in servers:
        server.stop()
