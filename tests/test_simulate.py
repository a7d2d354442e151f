"""The phone simulator: against a real server it finds no violation; against a
broken one it exits non-zero and names what was broken. Its images are valid."""
import base64
import json
import random
import struct
import subprocess
import threading
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

import simulate
from conftest import xhs_command

GROUPS = ('xhs_phone_log', 'xiaohongshu_userprofile', 'xiaohongshu_biji', 'xiaohongshu_direct_essages',
          'xhs_phone_management', 'DMS_screenshots', 'sms')


def run_simulator(*args, timeout=90):
    """Run the simulator as a command; (exit code, JSON summary, stderr)."""
    proc = subprocess.run(xhs_command() + ['simulate', '--json'] + [str(arg) for arg in args],
                          capture_output=True, text=True, timeout=timeout)
    try:
        result = json.loads(proc.stdout)
    except ValueError:
        pytest.fail('no JSON summary (exit %d): %s %s' % (proc.returncode, proc.stdout[-500:], proc.stderr[-2000:]))
    return proc.returncode, result, proc.stderr


@pytest.fixture
def fake_server():
    """A tiny HTTP server answering every request with answer(method, path, body)."""
    servers = []

    def start(answer):
        class Handler(BaseHTTPRequestHandler):
            protocol_version = 'HTTP/1.1'

            def do_GET(self):
                body = self.rfile.read(int(self.headers.get('Content-Length') or 0))
                status, ctype, data = answer(self.command, self.path, body)
                self.send_response(status)
                self.send_header('Content-Type', ctype)
                self.send_header('Content-Length', str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_POST = do_GET

            def log_message(self, *args):
                pass

        server = ThreadingHTTPServer(('127.0.0.1', 0), Handler)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return 'http://127.0.0.1:%d' % server.server_address[1]
    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def envelope(data, msg='获取成功'):
    return (200, 'application/json; charset=utf-8',
            json.dumps({'code': 200, 'msg': msg, 'data': data, 'note': {}}, ensure_ascii=False).encode('utf-8'))


# --------------------------------------------------------------------------
# Against the real server
# --------------------------------------------------------------------------

def test_a_seeded_day_keeps_the_contract(live):
    server = live()
    code, result, stderr = run_simulator('--url', 'http://127.0.0.1:%d' % server.port, '--phones', 5,
                                         '--seconds', 10, '--seed', 3, '--seed-work', '--db', server.db)
    assert code == 0, (result['violations'], result['errors'], stderr[-2000:])
    assert result['ok'] and result['violations']['count'] == 0
    assert not result['errors']['by_kind'].get('operator'), result['errors']
    for group in GROUPS:
        assert result['requests']['by_group'].get(group, 0) > 0, group
    assert len(result['styles']) == 5   # every wire style took part
    done = result['tasks_done']
    assert done['release'] >= 5 and done['dm_reply'] >= 1, done
    assert done['comment_reply'] + done['comment_delete'] + result['activity']['deletes_failed_reported'] >= 1
    activity = result['activity']
    assert activity['accounts_registered'] == 5 and activity['codes_received'] == 5
    assert activity['comments_reported'] >= 1 and activity['watchdog_checks'] >= 5
    assert activity['watchdog_abnormal'] == 0
    assert result['images']['png'] > 0 and result['images']['jpeg'] > 0
    assert result['images']['bytes'] > 100_000 * result['images']['uploaded']   # realistic sizes
    # Polling for the code saw 301 暂无验证码 first: counted, not flagged.
    assert set(result['codes']['xhs_phone_management/get_verification_code']) == {'200', '301'}
    # The server's own records agree with what the phones were told.
    listed = json.loads(server.cli('tasks', 'list', '--kind', 'release', '--status', 'done', '--json').stdout)
    assert len(listed) == done['release']
    assert all('/explore/' in task['result_url'] for task in listed)


def test_an_unseeded_server_is_not_flagged_for_having_no_work(live):
    """Empty pools and queues answer 301 profiles / 暂无可用手机号 / 当前无任务: all legitimate."""
    server = live()
    code, result, stderr = run_simulator('--url', 'http://127.0.0.1:%d' % server.port, '--phones', 3,
                                         '--seconds', 3, '--seed', 11)
    assert code == 0, (result['violations'], stderr[-2000:])
    assert result['violations']['count'] == 0 and result['errors']['count'] == 0
    assert result['codes']['xhs_phone_management/get_xhs_unregistered_information'] == {'301': 3}
    assert result['activity']['accounts_registered'] == 3   # with the SIMs' own numbers
    assert sum(result['tasks_done'].values()) == 0


# --------------------------------------------------------------------------
# Against broken servers
# --------------------------------------------------------------------------

def test_html_answers_are_a_violation(fake_server):
    url = fake_server(lambda method, path, body: (200, 'text/html', b'<html><body>Welcome to nginx!</body></html>'))
    code, result, _ = run_simulator('--url', url, '--phones', 2, '--seconds', 2)
    assert code == 1
    assert not result['ok'] and result['violations']['by_kind'].get('not_json', 0) > 0
    assert any('text/html' in item['detail'] for item in result['violations']['examples'])


def test_one_release_task_for_every_phone_is_a_violation(fake_server):
    def answer(method, path, body):
        if 'get_release_task' in path:
            return envelope({'id': 7, 'content': '同一篇笔记', 'platform': 1})
        if 'get_screenshot_time' in path:
            return envelope({'screenshot_time': 20})
        return envelope({}, '成功')
    code, result, _ = run_simulator('--url', fake_server(answer), '--phones', 3, '--seconds', 2)
    assert code == 1
    kinds = result['violations']['by_kind']
    assert kinds.get('double_handout', 0) > 0 and kinds.get('lost_completion', 0) > 0, kinds
    details = [item['detail'] for item in result['violations']['examples']]
    assert any('release task 7 handed to' in detail for detail in details), details


def test_non_200_status_is_resent_and_flagged(fake_server):
    url = fake_server(lambda method, path, body: (502, 'application/json', b'{"code":502}'))
    code, result, _ = run_simulator('--url', url, '--phones', 1, '--seconds', 1)
    assert code == 1 and result['violations']['by_kind'].get('http_status', 0) > 0
    assert result['requests']['resent'] == 3 * result['requests']['total']   # OkHttp: 3 more times


def test_no_server_exits_2():
    code, result, _ = run_simulator('--url', 'http://127.0.0.1:9', '--phones', 1, '--seconds', 1)
    assert code == 2 and not result['reached']


# --------------------------------------------------------------------------
# Images and wire encodings
# --------------------------------------------------------------------------

def png_chunks(data):
    assert data[:8] == b'\x89PNG\r\n\x1a\n'
    offset, chunks = 8, []
    while offset < len(data):
        length, = struct.unpack('>I', data[offset:offset + 4])
        kind, body = data[offset + 4:offset + 8], data[offset + 8:offset + 8 + length]
        crc, = struct.unpack('>I', data[offset + 8 + length:offset + 12 + length])
        assert crc == zlib.crc32(kind + body), kind
        chunks.append((kind, body))
        offset += 12 + length
    return chunks


def check_png(data):
    chunks = png_chunks(data)
    width, height = struct.unpack('>II', chunks[0][1][:8])
    assert chunks[0][0] == b'IHDR' and chunks[-1][0] == b'IEND'
    raw = zlib.decompress(b''.join(body for kind, body in chunks if kind == b'IDAT'))
    assert len(raw) == (width * 3 + 1) * height
    assert all(raw[row * (width * 3 + 1)] == 0 for row in range(height))   # filter bytes


def check_jpeg(data):
    """Walk the markers: header segments, then entropy data with only stuffed 0xFF
    and RST0..7 in order, then EOI; the restart count matches the MCU rows."""
    assert data[:2] == b'\xff\xd8' and data[-2:] == b'\xff\xd9'
    offset, frame = 2, None
    while data[offset + 1] != 0xDA:
        marker, length = data[offset + 1], struct.unpack('>H', data[offset + 2:offset + 4])[0]
        if marker == 0xC0:
            frame = struct.unpack('>HH', data[offset + 5:offset + 9])
        offset += 2 + length
    offset += 2 + struct.unpack('>H', data[offset + 2:offset + 4])[0]
    restarts, expected = 0, 0xD0
    position = data.find(b'\xff', offset)
    while position < len(data) - 2:
        following = data[position + 1]
        if following != 0:
            assert following == expected, hex(following)
            restarts, expected = restarts + 1, 0xD0 + (restarts + 1) % 8
        position = data.find(b'\xff', position + 2)
    height, width = frame
    assert restarts == (height + 7) // 8 - 1


@pytest.mark.parametrize('fmt', ['png', 'jpeg'])
def test_screenshots_are_valid_images_of_realistic_size(fmt):
    rng = random.Random(1)
    for width, height in simulate.SCREENS:
        data, mime = simulate.screenshot(rng, fmt, width, height, 'note')
        assert 100_000 < len(data) < 2_000_000, len(data)
        stamped = simulate.stamped(data, fmt, 'screenshot 460001 #1')
        for image in (data, stamped):
            (check_png if fmt == 'png' else check_jpeg)(image)
        assert mime == ('image/png' if fmt == 'png' else 'image/jpeg')


@pytest.mark.parametrize('variant', ['plain', 'wrapped', 'data-uri', 'urlsafe'])
def test_base64_variants_carry_the_same_bytes(variant):
    data = bytes(range(256)) * 40
    text = simulate.encode_base64(data, variant, 'image/png')
    if variant == 'data-uri':
        assert text.startswith('data:image/png;base64,')
        text = text.split(',', 1)[1]
    if variant == 'wrapped':
        assert all(len(line) <= 76 for line in text.splitlines())
    if variant == 'urlsafe':
        assert '+' not in text and '/' not in text and not text.endswith('=')
        text = text.replace('-', '+').replace('_', '/') + '=' * (-len(text) % 4)
    assert base64.b64decode(text) == data


def test_okhttp_form_encoding():
    body = simulate.form_body({'log_msg': '脚本启动 a+b/c', 'macaddr': 'AA:BB\n', 'n': [1, 2]})
    assert body == ('log_msg=%E8%84%9A%E6%9C%AC%E5%90%AF%E5%8A%A8%20a%2Bb%2Fc'
                    '&macaddr=AA%3ABB%0A&n=1&n=2').encode()
