"""Alerts to a group robot and the phones' activity history, through a real server."""
import base64
import http.server
import json
import os
import sqlite3
import threading
import time

import pytest

import models
import monitor

SIM = {'imsi': '460011234567801', 'iccid': '89860112345678901201'}


class Receiver(http.server.ThreadingHTTPServer):
    """A local stand-in for a robot webhook: records messages; can fail or hang."""

    def __init__(self, fail_first=0, hang=0):
        super().__init__(('127.0.0.1', 0), ReceiverHandler)
        self.messages, self.fail_first, self.hang = [], fail_first, hang
        self.attempts = 0
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self):
        return 'http://127.0.0.1:%d/robot/send?key=k' % self.server_address[1]

    def texts(self):
        return [message['text']['content'] for message in self.messages]

    def wait_for(self, predicate, timeout=10):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if predicate(self.texts()):
                return self.texts()
            time.sleep(0.05)
        raise AssertionError('not received: %r' % self.texts())


class ReceiverHandler(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers['Content-Length']))
        self.server.attempts += 1
        if self.server.hang:
            time.sleep(self.server.hang)
        if self.server.attempts <= self.server.fail_first:
            self.send_response(502)
            self.end_headers()
            return
        self.server.messages.append(json.loads(body))
        answer = b'{"errcode":0,"errmsg":"ok"}'
        self.send_response(200)
        self.send_header('Content-Length', str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, *args):
        pass


@pytest.fixture
def receiver():
    servers = []

    def make(**kwargs):
        servers.append(Receiver(**kwargs))
        return servers[-1]
    yield make
    for server in servers:
        server.shutdown()


def watched(live, receiver_):
    return live(['--alert-webhook', receiver_.url, '--monitor-interval', '0.2'])


def age(server, sql, *params):
    with sqlite3.connect(server.db) as conn:
        conn.execute(sql, params)


def test_a_phone_going_quiet_and_coming_back_is_alerted_once_each_and_kept_in_history(live, receiver):
    robot = receiver()
    server = watched(live, robot)
    server.cli('phones', 'add', '--imsi', SIM['imsi'], '--iccid', SIM['iccid'], '--label', 'A-01')
    assert server.call('/xhs_phone_log/add', dict(SIM, log_msg='在线'))['code'] == 200
    time.sleep(0.5)
    age(server, 'UPDATE phone SET last_seen = ?', time.time() - 3600)
    robot.wait_for(lambda texts: any('A-01' in t and '无活动' in t for t in texts))
    # An hour of silence made by another process: the server's copy of the phone
    # table learns of it when it is next read (models.COPY_TTL).
    time.sleep(models.COPY_TTL)
    assert server.call('/xhs_phone_log/add', dict(SIM, log_msg='回来了'))['code'] == 200
    texts = robot.wait_for(lambda texts: any('A-01 已恢复活动' in t for t in texts))
    time.sleep(1)   # several more scans: no repeats
    assert robot.texts() == texts and len(texts) == 2
    message = robot.messages[0]
    assert message['msgtype'] == 'text' and message['msg_type'] == 'text'
    assert message['content']['text'] == message['text']['content'].strip()
    history = json.loads(server.cli('phones', 'history', 'A-01', '--json').stdout)
    assert [row['event'] for row in history] == ['inactive', 'active']
    phones = json.loads(server.cli('status', '--json').stdout)['phones']
    assert phones == {'total': 1, 'offline': 0, 'unapproved': 0, 'active': 1, 'inactive': 0}


def test_stuck_task_failed_deletion_and_known_failure_log_are_alerted(live, receiver, tmp_path):
    robot = receiver()
    server = watched(live, robot)
    server.cli('tasks', 'add-release', '--content', '卡住的笔记')
    task_id = server.call('/xiaohongshu_biji/get_release_task', SIM)['data']['id']
    age(server, 'UPDATE task SET claimed_at = ?', time.time() - 7200)
    robot.wait_for(lambda texts: any('任务 #%d' % task_id in t for t in texts))
    status = json.loads(server.cli('status', '--json').stdout)
    assert [row['id'] for row in status['stuck_tasks']] == [task_id]

    comment = server.call('/DMS_screenshots/add_comment', dict(
        SIM, head_portrait='h', nick_name='杠精', comments_status='1', comments_content='广告',
        article_picture_address='a', screenshots_address='s'))['data']['id']
    server.cli('comments', 'delete', comment)
    assert server.call('/DMS_screenshots/comment_post_exception_instead', {'comment_id': comment})['code'] == 200
    robot.wait_for(lambda texts: any('删除评论 #%d' % comment in t for t in texts))

    for _ in range(2):
        server.call('/xhs_phone_log/add', dict(SIM, log_msg='没有找到回复私信用户: 路人甲'))
    robot.wait_for(lambda texts: any('没有找到回复私信用户' in t for t in texts))
    time.sleep(1)
    assert sum('没有找到回复私信用户' in t for t in robot.texts()) == 1   # rate-limited
    assert sum('任务 #%d' % task_id in t for t in robot.texts()) == 1


def test_a_failing_webhook_is_retried(live, receiver):
    robot = receiver(fail_first=1)
    server = watched(live, robot)
    server.call('/xhs_phone_log/add', dict(SIM, log_msg='没有找到回复私信用户'))
    robot.wait_for(lambda texts: len(texts) == 1, timeout=15)
    assert robot.attempts == 2


def test_a_hanging_webhook_does_not_slow_the_phones(live, receiver):
    robot = receiver(hang=20)
    server = watched(live, robot)
    for i in range(5):
        server.call('/xhs_phone_log/add', dict(SIM, imsi='46001123456780%d' % i, log_msg='没有找到回复私信用户'))
    time.sleep(0.5)
    started = time.monotonic()
    for i in range(40):
        assert server.call('/xhs_phone_log/add', dict(SIM, log_msg='正常 %d' % i))['code'] == 200
    assert time.monotonic() - started < 5
    assert robot.attempts >= 1


@pytest.mark.parametrize('url, shape', [
    ('https://qyapi.weixin.qq.com/cgi-bin/webhook/send?key=x', {'msgtype': 'text', 'text': {'content': '喂'}}),
    ('https://oapi.dingtalk.com/robot/send?access_token=x', {'msgtype': 'text', 'text': {'content': '喂'}}),
    ('https://open.feishu.cn/open-apis/bot/v2/hook/x', {'msg_type': 'text', 'content': {'text': '喂'}}),
    ('https://open.larksuite.com/open-apis/bot/v2/hook/x', {'msg_type': 'text', 'content': {'text': '喂'}}),
])
def test_each_robot_gets_the_text_message_shape_it_accepts(url, shape):
    assert monitor.robot_payload(url, '喂') == shape


def test_temporary_image_files_left_by_a_crash_are_removed_at_start(live, tmp_path):
    media = tmp_path / 'media'
    media.mkdir()
    stale, fresh = media / 'upload.0badf00d.tmp', media / 'upload.0c0ffee0.tmp'
    for path in (stale, fresh):
        path.write_bytes(b'\x89PNG' + b'\x00' * 4096)
    hours_ago = time.time() - 2 * 3600
    os.utime(stale, (hours_ago, hours_ago))
    os.symlink('loop.tmp', media / 'loop.tmp')   # can't be looked at: passed over, not fatal
    server = live(db=str(tmp_path / 'live.db'))
    deadline = time.monotonic() + 10
    while stale.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not stale.exists()
    assert fresh.exists()   # it may still be being written by a running process
    assert 'removed 1 temporary image files' in server.stderr_text()


def test_image_files_no_row_names_are_removed_once_an_hour_old(live, tmp_path):
    server = live(db=str(tmp_path / 'live.db'))
    image = b'\x89PNG\r\n\x1a\n' + os.urandom(3000) + b'\x00\x00\x00\x00IEND\xaeB`\x82'
    key = server.call('/xiaohongshu_direct_essages/save_screenshots',
                      dict(SIM, name='甲', img_base64_data=base64.b64encode(image).decode()))['data']['key']
    server.stop()
    media = tmp_path / 'media'
    kept = media / key.rsplit('/', 1)[1]
    orphan, fresh = media / ('ab' * 16 + '.png'), media / ('cd' * 16 + '.png')
    orphan.write_bytes(image[:100])
    fresh.write_bytes(image[:100])
    hours_ago = time.time() - 2 * 3600
    for path in (kept, orphan):
        os.utime(path, (hours_ago, hours_ago))
    server = live(db=str(tmp_path / 'live.db'))
    deadline = time.monotonic() + 10
    while orphan.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not orphan.exists()
    assert kept.read_bytes() == image and fresh.exists()
    assert 'removed 1 image files no row names' in server.stderr_text()
