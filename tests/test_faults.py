"""The contract holds through faults: a busy database, a killed server, huge and slow bodies."""
import base64
import hashlib
import json
import os
import signal
import socket
import sqlite3
import subprocess
import threading
import time
import urllib.parse

import xhs_server
from conftest import b64, png_like, xhs_command

SIM = {'imsi': '460011234567801', 'iccid': '89860112345678901201'}


def png(seed, size=20000):
    """A distinct PNG-shaped payload of about `size` bytes."""
    return png_like(hashlib.sha256(str(seed).encode()).digest() * (size // 32))


def rss_kb(pid):
    with open('/proc/%d/status' % pid) as status:
        for line in status:
            if line.startswith('VmRSS:'):
                return int(line.split()[1])
    raise AssertionError('no VmRSS')


def raw_exchange(port, head, body_chunks=(), pause=None, timeout=90):
    """Send a request by hand (optionally slowly) and return the parsed answer body."""
    sock = socket.create_connection(('127.0.0.1', port), timeout=timeout)
    try:
        sock.sendall(head)
        for chunk in body_chunks:
            if pause:
                pause()
            sock.sendall(chunk)
        return read_answer(sock)
    finally:
        sock.close()


def read_answer(sock):
    data = b''
    while b'\r\n\r\n' not in data:
        part = sock.recv(65536)
        if not part:
            raise ConnectionError('closed before the answer: %r' % data)
        data += part
    head, _, body = data.partition(b'\r\n\r\n')
    length = int([line.split(b':')[1] for line in head.split(b'\r\n')
                  if line.lower().startswith(b'content-length:')][0])
    while len(body) < length:
        body += sock.recv(65536)
    assert head.startswith(b'HTTP/1.1 200'), head
    return json.loads(body[:length])


def post_head(path, length, ctype='application/x-www-form-urlencoded'):
    return ('POST %s HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: %s\r\nContent-Length: %d\r\n\r\n'
            % (path, ctype, length)).encode()


# --------------------------------------------------------------------------
# A busy database
# --------------------------------------------------------------------------

def test_database_locked_past_busy_timeout_answers_503_envelope(live):
    server = live(['--busy-timeout', '0.5'])
    assert server.call('/xhs_phone_log/add', dict(SIM, log_msg='before'))['code'] == 200
    holder = sqlite3.connect(server.db, isolation_level=None)
    holder.execute('BEGIN IMMEDIATE')   # the operator's long write, say
    try:
        started = time.monotonic()
        answer = server.call('/xhs_phone_log/add', dict(SIM, log_msg='during'))
        assert answer == {'code': 503, 'msg': '服务繁忙，请稍后重试', 'data': {}, 'note': {}}
        assert time.monotonic() - started < 5
        # Reads need no lock in WAL mode: the watchdog is still answered.
        status = server.call('/xhs_phone_management/get_phone_work_status',
                             dict(SIM, phone_type=2), method='GET')
        assert status['code'] == 200 and status['data']['flag'] is False
    finally:
        holder.execute('ROLLBACK')
        holder.close()
    assert server.call('/xhs_phone_log/add', dict(SIM, log_msg='after'))['code'] == 200
    logs = json.loads(server.cli('logs', '--json').stdout)
    assert [row['msg'] for row in logs] == ['before', 'after']


# --------------------------------------------------------------------------
# Killed mid-write
# --------------------------------------------------------------------------

def write_load(server, stop, answered):
    """Logs, completions and uploads from several threads; record what got code 200."""
    def logs(n):
        i = 0
        while not stop.is_set():
            msg = 'load %d-%d 日志' % (n, i)
            if call_quietly(server, '/xhs_phone_log/add', dict(SIM, log_msg=msg)) == 200:
                answered['logs'].append(msg)
            i += 1

    def completions():
        while not stop.is_set():
            body = call_body(server, '/xiaohongshu_biji/get_release_task', SIM)
            if not body or not body['data']:
                return
            task_id = body['data']['id']
            url = 'https://www.xiaohongshu.com/explore/%024x' % task_id
            if call_quietly(server, '/xiaohongshu_biji/upload_url', dict(task_id=task_id, url=url)) == 200:
                answered['done'].append(task_id)

    def uploads():
        i = 0
        while not stop.is_set():
            data = png(i, 300000)
            body = call_body(server, '/xiaohongshu_direct_essages/save_screenshots', dict(
                SIM, name='客户%d' % i, img_base64_data=base64.b64encode(data).decode()))
            if body and body['code'] == 200:
                answered['images'].append((body['data']['key'].rsplit('/', 1)[1], data))
            i += 1
    return [threading.Thread(target=logs, args=(n,)) for n in range(3)] + [
        threading.Thread(target=completions), threading.Thread(target=uploads)]


def call_body(server, path, params):
    try:
        return server.call(path, params)
    except (OSError, AssertionError, ValueError):
        return None   # the server died under us: that answer never came


def call_quietly(server, path, params):
    body = call_body(server, path, params)
    return body and body['code']


def test_sigkill_under_write_load_loses_no_answered_write(live, tmp_path):
    server = live()
    lines = '\n'.join(json.dumps({'content': 'note %d' % i}) for i in range(5000))
    (tmp_path / 'tasks.jsonl').write_text(lines)
    server.cli('tasks', 'import', tmp_path / 'tasks.jsonl')
    stop = threading.Event()
    answered = {'logs': [], 'done': [], 'images': []}
    threads = write_load(server, stop, answered)
    for thread in threads:
        thread.start()
    time.sleep(2.5)
    server.proc.send_signal(signal.SIGKILL)
    server.proc.wait()
    stop.set()
    for thread in threads:
        thread.join(30)
    assert len(answered['logs']) > 50 and answered['done'] and answered['images'], {
        key: len(value) for key, value in answered.items()}

    again = live(db=server.db)
    logs = {row['msg'] for row in json.loads(again.cli('logs', '--limit', '1000000', '--json').stdout)}
    assert set(answered['logs']) <= logs
    tasks = {t['id']: t for t in json.loads(again.cli('tasks', 'list', '--limit', '10000', '--json').stdout)}
    assert all(tasks[task_id]['status'] == 'done' for task_id in answered['done'])
    media = os.path.join(os.path.dirname(server.db), 'media')
    for name, data in answered['images']:
        with open(os.path.join(media, name), 'rb') as stored:
            assert stored.read() == data
    check = sqlite3.connect(server.db)
    assert check.execute('PRAGMA integrity_check').fetchone()[0] == 'ok'
    for name, size, sha in check.execute('SELECT name, size, sha256 FROM image'):
        with open(os.path.join(media, name), 'rb') as stored:
            content = stored.read()
        assert len(content) == size and hashlib.sha256(content).hexdigest() == sha
    check.close()


# --------------------------------------------------------------------------
# Big and slow bodies
# --------------------------------------------------------------------------

def test_body_over_limit_gets_413_without_growing_memory(live):
    server = live()
    before = rss_kb(server.proc.pid)
    chunk = b'x' * (1024 * 1024)
    drained = raw_exchange(server.port, post_head('/xhs_phone_log/add', 40 * len(chunk)), [chunk] * 40)
    assert drained['code'] == 413 and drained['msg'] == '请求体过大'
    # A claimed gigabyte is not even read: the answer comes at once and the connection closes.
    huge = raw_exchange(server.port, post_head('/xhs_phone_log/add', 1 << 30))
    assert huge['code'] == 413
    assert rss_kb(server.proc.pid) - before < 20 * 1024
    assert server.call('/xhs_phone_log/add', dict(SIM, log_msg='still fine'))['code'] == 200


def test_slow_upload_with_a_pause_while_others_are_served(live):
    """2 MB at 50 KB/s with a 12 s pause; 30 idle keep-alive connections; other phones meanwhile."""
    server = live()
    idle = []
    for _ in range(30):
        sock = socket.create_connection(('127.0.0.1', server.port), timeout=10)
        sock.sendall(b'GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n')
        assert read_answer(sock)['code'] == 200
        idle.append(sock)
    image = base64.b64encode(png('slow', 1500000)).decode()
    body = urllib.parse.urlencode(dict(SIM, name='慢速', img_base64_data=image)).encode()
    chunks = [body[i:i + 5000] for i in range(0, len(body), 5000)]
    sent = [0]

    def pace():
        sent[0] += 1
        time.sleep(12 if sent[0] == len(chunks) // 2 else 0.1)
    result = {}
    uploader = threading.Thread(target=lambda: result.update(raw_exchange(
        server.port, post_head('/xiaohongshu_direct_essages/save_screenshots', len(body)), chunks, pace)))
    uploader.start()
    latencies = []
    while uploader.is_alive():
        started = time.monotonic()
        assert server.call('/xhs_phone_log/add', dict(SIM, log_msg='meanwhile'))['code'] == 200
        latencies.append(time.monotonic() - started)
        time.sleep(0.5)
    uploader.join()
    assert result['code'] == 200 and result['data']['key'].endswith('.png'), result
    assert len(latencies) > 50 and max(latencies) < 2, max(latencies)
    for sock in idle:
        sock.close()


def thread_count(pid):
    return len(os.listdir('/proc/%d/task' % pid))


def slowest_of_ten_log_posts(server):
    """Seconds the slowest of ten log posts took, made one after another (all must succeed)."""
    latencies = []
    for _ in range(10):
        started = time.monotonic()
        assert server.call('/xhs_phone_log/add', dict(SIM, log_msg='meanwhile'))['code'] == 200
        latencies.append(time.monotonic() - started)
    return max(latencies)


def test_workers_waiting_on_uploads_are_replaced_then_let_go(live):
    """Two workers, five phones pausing mid-upload: the others are still answered at once,
    every upload is stored when it ends, and the extra workers leave afterwards."""
    server = live(['--threads', '2', '--max-threads', '12'])
    assert server.call('/xhs_phone_log/add', dict(SIM, log_msg='warm'))['code'] == 200
    resting = thread_count(server.proc.pid)
    bodies = [urllib.parse.urlencode(dict(SIM, name='慢速%d' % k, img_base64_data=base64.b64encode(
        png('pool%d' % k, 300000)).decode())).encode() for k in range(5)]
    uploads = []
    for body in bodies:
        sock = socket.create_connection(('127.0.0.1', server.port), timeout=60)
        sock.sendall(post_head('/xiaohongshu_direct_essages/save_screenshots', len(body)))
        sock.sendall(body[:len(body) // 2])   # and then the phone's Wi-Fi stalls
        uploads.append(sock)
    time.sleep(0.5)
    waiting = thread_count(server.proc.pid)
    assert waiting >= resting + 5, (resting, waiting)
    assert slowest_of_ten_log_posts(server) < 1
    for sock, body in zip(uploads, bodies):
        sock.sendall(body[len(body) // 2:])
    keys = set()
    for sock in uploads:
        answer = read_answer(sock)
        assert answer['code'] == 200, answer
        keys.add(answer['data']['key'])
        sock.close()
    assert len(keys) == 5
    deadline = time.monotonic() + 20
    while thread_count(server.proc.pid) > resting and time.monotonic() < deadline:
        time.sleep(0.25)
    assert thread_count(server.proc.pid) == resting


def test_workers_waiting_on_the_last_small_piece_of_a_big_form_are_replaced(live):
    """A form over 64 KB is read in pieces; the worker counts as waiting on the phone
    for every piece, the last one too, however small."""
    server = live(['--threads', '2', '--max-threads', '12'])
    assert server.call('/xhs_phone_log/add', dict(SIM, log_msg='warm'))['code'] == 200
    size = xhs_server.FORM_PIECE + 10000
    bodies = [urllib.parse.urlencode(dict(SIM, log_msg='慢%d ' % k + 'x' * size))[:size].encode()
              for k in range(4)]
    uploads = []
    for body in bodies:
        sock = socket.create_connection(('127.0.0.1', server.port), timeout=60)
        sock.sendall(post_head('/xhs_phone_log/add', len(body)) + body[:xhs_server.FORM_PIECE + 10])
        uploads.append(sock)
    time.sleep(0.5)
    assert slowest_of_ten_log_posts(server) < 1
    for sock, body in zip(uploads, bodies):
        sock.sendall(body[xhs_server.FORM_PIECE + 10:])
    for sock in uploads:
        assert read_answer(sock)['code'] == 200
        sock.close()


def test_max_threads_below_threads_is_refused(tmp_path):
    result = subprocess.run(xhs_command() + ['--db', str(tmp_path / 'x.db'), 'serve', '--threads', '9',
                                             '--max-threads', '4'], capture_output=True, text=True, timeout=30)
    assert result.returncode != 0
    assert 'must be at least --threads (9)' in result.stderr and 'Traceback' not in result.stderr


def test_connections_that_say_nothing_hold_no_worker(live):
    """More silent connections than worker threads (8): other phones are answered at once."""
    server = live()
    silent = [socket.create_connection(('127.0.0.1', server.port), timeout=10) for _ in range(60)]
    time.sleep(0.5)   # the server has accepted them all
    assert slowest_of_ten_log_posts(server) < 2
    # A silent connection is still served when it speaks.
    silent[0].sendall(b'GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n')
    assert read_answer(silent[0])['code'] == 200
    for sock in silent:
        sock.close()


def test_a_burst_of_new_connections_is_answered_in_full(live):
    """300 phones connect and ask at once (more than one turn of the accept loop
    takes): every one gets its answer, and each answer carries its own log line."""
    server = live()
    socks = []
    for k in range(300):
        sock = socket.create_connection(('127.0.0.1', server.port), timeout=30)
        body = urllib.parse.urlencode(dict(SIM, log_msg='burst %d' % k)).encode()
        socks.append((sock, post_head('/xhs_phone_log/add', len(body)) + body))
    for sock, request in socks:
        sock.sendall(request)
    for sock, _ in socks:
        answer = read_answer(sock)
        assert answer['code'] == 200, answer
        sock.close()
    lines = json.loads(server.cli('logs', '--limit', '1000', '--json').stdout)
    assert sorted(line['msg'] for line in lines if line['msg'].startswith('burst ')) == \
        sorted('burst %d' % k for k in range(300))


# --------------------------------------------------------------------------
# Resent requests
# --------------------------------------------------------------------------

def test_resent_requests_change_nothing(live, tmp_path):
    server = live()
    shot = dict(SIM, name='路人甲', img_base64_data=b64('dm.png'))
    first = server.call('/xiaohongshu_direct_essages/save_screenshots', shot)
    second = server.call('/xiaohongshu_direct_essages/save_screenshots', shot)
    assert first['code'] == 200 and second['data']['key'] == first['data']['key']
    media = os.listdir(os.path.join(os.path.dirname(server.db), 'media'))
    assert media == [first['data']['key'].rsplit('/', 1)[1]]

    sms = {'from': '1069000000000', 'content': '【小红书】验证码 604213，5分钟内有效', 'phone_number': '13900000001'}
    assert server.call('/sms/receive', sms)['data']['duplicate'] is False
    assert server.call('/sms/receive', sms)['data']['duplicate'] is True
    codes = json.loads(server.cli('codes', 'list', '--json', '--reveal').stdout)
    assert [row['code'] for row in codes] == ['604213']

    (tmp_path / 'one.jsonl').write_text('{"content": "一条笔记"}')
    server.cli('tasks', 'import', tmp_path / 'one.jsonl')
    task_id = server.call('/xiaohongshu_biji/get_release_task', SIM)['data']['id']
    done = dict(task_id=task_id, url='https://www.xiaohongshu.com/explore/6751c0de000000000b00aa01?a=1')
    assert server.call('/xiaohongshu_biji/upload_url', done)['code'] == 200
    before = json.loads(server.cli('tasks', 'list', '--json').stdout)
    assert server.call('/xiaohongshu_biji/upload_url', done)['code'] == 200
    assert json.loads(server.cli('tasks', 'list', '--json').stdout) == before
