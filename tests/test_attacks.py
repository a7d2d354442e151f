"""What an attack on a running server found once, kept from coming back."""
import base64
import json
import os
import socket
import sqlite3
import subprocess
import time
import urllib.parse

import pytest

from conftest import PHONE_A, png_like, sample, xhs_command

SIM = 'imsi=%s&iccid=%s' % (PHONE_A['imsi'], PHONE_A['iccid'])


def exchange(port, raw, half_close=False):
    """Send raw bytes; the answer's (status line, envelope or None)."""
    sock = socket.create_connection(('127.0.0.1', port), timeout=15)
    try:
        sock.sendall(raw)
        if half_close:
            sock.shutdown(socket.SHUT_WR)
        data = b''
        while True:
            part = sock.recv(65536)
            if not part:
                break
            data += part
            if b'\r\n\r\n' in data:
                head, _, body = data.partition(b'\r\n\r\n')
                length = [int(line.split(b':')[1]) for line in head.split(b'\r\n')
                          if line.lower().startswith(b'content-length:')]
                if length and len(body) >= length[0]:
                    break
    finally:
        sock.close()
    head, _, body = data.partition(b'\r\n\r\n')
    return head.split(b'\r\n')[0], json.loads(body) if body.startswith(b'{') else None


def post(path, extra=b''):
    return (b'POST %s HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\n'
            % path.encode() + extra)


@pytest.fixture
def server(live):
    running = live()
    yield running
    assert running.call('/healthz', method='GET')['code'] == 200
    assert 'Traceback' not in running.stderr_text()


def test_a_body_cut_short_is_refused_whole_and_the_retry_succeeds(server):
    server.cli('tasks', 'add-release', '--content', '笔记')
    task = server.call('/xiaohongshu_biji/get_release_task', PHONE_A)['data']['id']
    body = ('task_id=%d&url=%s' % (task, urllib.parse.quote(
        'https://www.xiaohongshu.com/explore/6751c0de000000000b00aa01', safe=''))).encode()
    head = post('/xiaohongshu_biji/upload_url', b'Content-Length: %d\r\n\r\n' % len(body))
    status, answer = exchange(server.port, head + body[:-20], half_close=True)
    assert answer['code'] == 301 and answer['msg'] == '请求格式无效: 请求体不完整'
    assert json.loads(server.cli('tasks', 'list', '--json').stdout)[0]['status'] == 'claimed'
    assert server.call('/xiaohongshu_biji/upload_url', dict(task_id=task, url=urllib.parse.unquote(
        body.split(b'url=')[1].decode())))['code'] == 200


def test_a_big_form_cut_short_stores_nothing_and_the_retry_succeeds(server):
    """A screenshot form is decoded as it arrives; cut off anywhere, nothing of it is kept."""
    image = png_like(os.urandom(600000))
    body = urllib.parse.urlencode(dict(PHONE_A, name='截断', img_base64_data=base64.b64encode(image))).encode()
    head = post('/xiaohongshu_direct_essages/save_screenshots', b'Content-Length: %d\r\n\r\n' % len(body))
    for cut in (1000, 300000, len(body) - 10):
        status, answer = exchange(server.port, head + body[:cut], half_close=True)
        assert answer['code'] == 301 and answer['msg'] == '请求格式无效: 请求体不完整', cut
    check = sqlite3.connect(server.db)
    try:
        assert check.execute('SELECT COUNT(*) FROM screenshot').fetchone()[0] == 0
        assert check.execute('SELECT COUNT(*) FROM image').fetchone()[0] == 0
        status, answer = exchange(server.port, head + body)
        assert answer['code'] == 200, answer
        assert check.execute('SELECT COUNT(*) FROM screenshot').fetchone()[0] == 1
        assert check.execute('SELECT size FROM image').fetchone()[0] == len(image)
    finally:
        check.close()


@pytest.mark.parametrize('chunks', [b'zz\r\nlog_msg=x\r\n0\r\n\r\n', b'ffffffffffffffffffff\r\nx\r\n0\r\n\r\n',
                                    b'7fffffffffffffff\r\nlog_msg=x\r\n0\r\n\r\n'])
def test_broken_chunking_is_refused_without_a_traceback(server, chunks):
    head = post('/xhs_phone_log/add', b'Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n')
    status, answer = exchange(server.port, head + chunks)
    assert status.startswith(b'HTTP/1.1 200') and answer['code'] == 301


def test_lying_content_length_forms_are_refused(server):
    body = b'log_msg=x&' + SIM.encode()
    for length in (b'+%d' % len(body), b'%d_0' % len(body)):
        status, answer = exchange(server.port, post('/xhs_phone_log/add') + b'Content-Length: ' + length
                                  + b'\r\nConnection: close\r\n\r\n' + body)
        assert answer is None or answer['code'] in (301, 402), (length, status, answer)
    assert json.loads(server.cli('logs', '--json').stdout) == []


def test_deep_json_lone_surrogates_and_huge_numbers_get_envelopes(app, ok_run):
    deep = '{"log_msg": ' + '[' * 50000 + ']' * 50000 + '}'
    res = app.post('/xhs_phone_log/add', deep.encode(), content_type='application/json')
    assert json.loads(res.body)['code'] == 301
    res = app.post('/xhs_phone_log/add', b'{"log_msg": "a\\ud800b", "imsi": "%s", "iccid": "%s"}'
                   % (PHONE_A['imsi'].encode(), PHONE_A['iccid'].encode()), content_type='application/json')
    assert json.loads(res.body)['code'] == 200
    assert json.loads(ok_run('logs', '--json').stdout)[-1]['msg'] == 'a\ufffdb'
    body = app.call('/xiaohongshu_userprofile/update_userinfo', dict(
        PHONE_A, phone_num='13900000009', name='n', xiaohongshu_id='x1', home_url='http://h',
        macaddr='aa:bb:cc:dd:ee:01', platform='9223372036854775808'), method='POST', encoding='form')
    assert body == {'code': 301, 'msg': '参数无效: platform', 'data': {}, 'note': {}}


def test_absurd_completion_times_are_refused(app, ok_run):
    for value in ('99999999999999999999', '0001-01-01 00:00:00', '1'):
        body = app.call('/DMS_screenshots/reply_comment_is_success',
                        {'comment_id': '1', 'comment_completion_time': value}, method='POST', encoding='form')
        assert body['msg'] == '参数无效: comment_completion_time', value


def test_head_on_a_task_poll_claims_nothing(app, ok_run):
    ok_run('tasks', 'add-release', '--content', '笔记')
    res = app.request('/xiaohongshu_biji/get_release_task?' + SIM, method='HEAD')
    assert res.status_int == 200
    assert json.loads(ok_run('tasks', 'list', '--json').stdout)[0]['status'] == 'pending'


@pytest.mark.parametrize('cut', [5, 100])
def test_a_cut_off_screenshot_is_refused(app, cut):
    image = base64.b64encode(sample('dm.png')).decode()[:-cut]
    body = app.call('/xiaohongshu_direct_essages/save_screenshots', dict(PHONE_A, name='甲', img_base64_data=image),
                    method='POST', encoding='form')
    assert body['code'] == 301 and body['msg'].startswith('参数无效: img_base64_data')


def test_huge_headers_are_refused_and_the_server_keeps_answering(server):
    started = time.monotonic()
    sock = socket.create_connection(('127.0.0.1', server.port), timeout=30)
    try:
        sock.sendall(b'GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: ')
        try:
            for _ in range(20):
                sock.sendall(b'a' * (1024 * 1024))
        except OSError:
            pass   # refused mid-way: what we want
        sock.settimeout(10)
        answer = sock.recv(200)
    except OSError:
        answer = b''
    finally:
        sock.close()
    assert not answer.startswith(b'HTTP/1.1 200'), answer
    assert time.monotonic() - started < 30


# --------------------------------------------------------------------------
# The CLI
# --------------------------------------------------------------------------

def one_line_error(result):
    assert result.exit_code != 0 and isinstance(result.exception, SystemExit), result.output
    assert 'Traceback' not in result.output and len(result.stderr.strip().splitlines()) == 1, result.output
    return result.stderr


@pytest.mark.parametrize('args', [
    ('tasks', 'add-release', '--content', 'x', '--priority', '9' * 23),
    ('tasks', 'add-release', '--content', 'x', '--platform', '9' * 23),
    ('tasks', 'list', '--limit', '9' * 23),
    ('tasks', 'requeue', '9' * 23),
    ('comments', 'delete', '9' * 23),
    ('tasks', 'add-release', '--content', 'bad \udcff text'),
    ('tasks', 'add-release', '--content', 'x', '--at', '0001-01-01'),
    ('tasks', 'add-release', '--content', 'x', '--at', '+99999999999h'),
    ('settings', 'rest_day', '9' * 23),
    ('settings', 'max_body_mb', '100000000'),
    ('settings', 'alert_webhook', 'not-a-url'),
    ('phones', 'add', '--imsi', '460011234567809', '--iccid', '89860112345678901209', '--label', ''),
    ('phones', 'add', '--imsi', '460011234567809', '--iccid', '89860112345678901209', '--label', 'A\n02'),
    ('phones', 'add', '--imsi', '460011234567809', '--iccid', '89860112345678901209',
     '--label', PHONE_A['imsi']),
])
def test_cli_refuses_absurd_arguments_in_one_line(run, ok_run, args):
    ok_run('phones', 'add', '--imsi', PHONE_A['imsi'], '--iccid', PHONE_A['iccid'], '--label', 'A-01')
    before = ok_run('tasks', 'list', '--json').stdout, ok_run('phones', 'list', '--json').stdout
    one_line_error(run(*args))
    assert (ok_run('tasks', 'list', '--json').stdout, ok_run('phones', 'list', '--json').stdout) == before


@pytest.mark.parametrize('content, imported', [
    ('13900000031\r13900000032\r', 2),                               # old Mac line ends
    ('{"phone_number": "139000000' + '[' * 5000 + '"}\n13900000033\n', None),
])
def test_numbers_import_survives_odd_files(run, tmp_path, content, imported):
    path = tmp_path / 'numbers.txt'
    path.write_text(content, newline='')
    result = run('numbers', 'import', path)
    assert 'Traceback' not in result.output
    if imported is not None:
        assert result.exit_code == 0 and 'imported %d numbers' % imported in result.stdout


@pytest.mark.parametrize('content, reason', [
    ('{"content": "' + 'x' * 200000 + '"}\n', None),                 # a long line is just long
    ('{"content": ' + '[' * 100000 + ']' * 100000 + '}\n', 'not a JSON object'),
    ('{"content": "a\\ud800b"}\n', None),
    ('{"content": "x", "priority": "99999999999999999999999"}\n', 'priority'),
])
def test_tasks_import_takes_or_names_each_odd_line(run, ok_run, tmp_path, content, reason):
    path = tmp_path / 'tasks.jsonl'
    path.write_text(content)
    result = run('tasks', 'import', path)
    assert result.exit_code == 0 and 'Traceback' not in result.output, result.output
    if reason:
        assert 'line 1: skipped' in result.stderr and reason in result.stderr
    else:
        assert 'imported 1 release tasks' in result.stdout


def test_a_csv_header_with_an_unknown_column_imports_nothing(run, ok_run, tmp_path):
    path = tmp_path / 'tasks.csv'
    path.write_text('text,title\n笔记,标题\n')
    assert 'unknown column text' in one_line_error(run('tasks', 'import', path))
    assert json.loads(ok_run('tasks', 'list', '--json').stdout) == []


def test_logs_piped_into_head_stop_quietly(run, ok_run, db_path):
    ok_run('phones', 'add', '--imsi', PHONE_A['imsi'], '--iccid', PHONE_A['iccid'])
    with sqlite3.connect(db_path) as conn:   # enough lines that head closes the pipe mid-way
        conn.executemany('INSERT INTO log (at, msg) VALUES (?, ?)', ((time.time(), '行 %d ' % i + 'x' * 100)
                                                                    for i in range(30000)))
    command = ' '.join(xhs_command()) + ' --db %s logs --limit 100000 | head -1' % db_path
    result = subprocess.run(['bash', '-c', command], capture_output=True, text=True)
    assert result.stderr == '' and result.stdout.startswith(time.strftime('%Y-')), result.stderr
