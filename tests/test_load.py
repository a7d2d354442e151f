"""A working morning at scale against a real server: 50 phones, the operator adding more meanwhile."""
import base64
import json
import os
import sqlite3
import subprocess
import threading
import time
from collections import Counter, defaultdict

from click.testing import CliRunner

import cli
import models
from conftest import png_like, run_threads, xhs_command

PHONES = 50


def sim(n):
    return {'imsi': '46001%010d' % n, 'iccid': '898601%014d' % n}


class Operator:
    """The CLI run in this process (fast) against the live server's database."""

    def __init__(self, db):
        self.db, self.runner = db, CliRunner()

    def __call__(self, *args):
        result = self.runner.invoke(cli.main, ['--db', self.db] + [str(a) for a in args])
        assert result.exit_code == 0, result.output
        return result.output

    def json(self, *args):
        return json.loads(self(*args, '--json'))


def prepare(server, operator, tmp_path):
    (tmp_path / 'numbers.txt').write_text('\n'.join('137%08d' % i for i in range(100)))
    (tmp_path / 'profiles.jsonl').write_text('\n'.join(json.dumps({
        'gender_id': 1 + i % 2, 'birthday': '1998-01-%02d' % (1 + i % 28), 'name': '新号%03d' % i})
        for i in range(100)))
    (tmp_path / 'release.jsonl').write_text('\n'.join(json.dumps({'content': '笔记 %d 🍂' % i})
                                                     for i in range(1000)))
    for name in ('numbers', 'profiles', 'tasks'):
        operator(name, 'import', tmp_path / {'numbers': 'numbers.txt', 'profiles': 'profiles.jsonl',
                                             'tasks': 'release.jsonl'}[name])
    for n in range(PHONES):
        operator('phones', 'add', '--label', 'P-%02d' % n, '--imsi', sim(n)['imsi'], '--iccid', sim(n)['iccid'])
        for k in range(4):
            operator('tasks', 'add-reply', '--phone', 'P-%02d' % n, '--name', '客户%d' % k, '--msg', '您好 %d-%d' % (n, k))

    def report_comments(n):
        for k in range(4):
            body = server.call('/DMS_screenshots/add_comment', dict(
                sim(n), head_portrait='https://a.invalid/%d.jpg' % k, nick_name='网友%d' % k, comments_status='1',
                comments_content='评论 %d-%d' % (n, k), article_picture_address='https://a.invalid/n%d.png' % n,
                screenshots_address='https://a.invalid/s%d-%d.png' % (n, k)))
            assert body['code'] == 200, body
    run_threads(PHONES, report_comments)
    for comment in operator.json('comments', 'list', '--limit', '1000'):
        operator('comments', 'reply', comment['id'], '谢谢 %s' % comment['content'])


def test_fifty_phones_drain_every_queue_while_the_operator_adds_more(live, tmp_path):
    server = live()
    operator = Operator(server.db)
    prepare(server, operator, tmp_path)
    owners = {'release': defaultdict(set), 'reply': defaultdict(set), 'comment': defaultdict(set)}
    done = Counter()
    numbers, profiles = {}, []
    adding = threading.Event()

    def poll_and_finish(n, kind, poll, finish, id_field):
        body = server.call(poll, sim(n), method='GET')
        assert body['code'] == 200, body
        if not body['data']:
            return False
        task_id = body['data']['id']
        owners[kind][task_id].add(n)
        answer = server.call(finish, {id_field: task_id, 'url': 'https://www.xiaohongshu.com/explore/%024x' % task_id})
        assert answer['code'] == 200, answer
        done[kind, task_id] += 1
        return True

    def phone(n):
        for extra in (0, 1000):   # each thread plays two SIMs for the number pool
            numbers[n + extra] = server.call('/xhs_phone_management/get_phone_number',
                                             sim(n + extra))['data']['phone_number']
        got = server.call('/xhs_phone_management/get_xhs_unregistered_information',
                          dict(sim(n), get_info_number=2))
        profiles.extend(item['id'] for item in got['data'].get('ret_data', []))
        while True:
            worked = [poll_and_finish(n, 'release', '/xiaohongshu_biji/get_release_task',
                                      '/xiaohongshu_biji/upload_url', 'task_id'),
                      poll_and_finish(n, 'reply', '/xiaohongshu_direct_essages/get_reply',
                                      '/xiaohongshu_direct_essages/reply_save', 'task_id'),
                      poll_and_finish(n, 'comment', '/DMS_screenshots/query_reply_task',
                                      '/DMS_screenshots/reply_comment_is_success', 'comment_id')]
            # The server learns of the operator's last tasks (another process) within
            # COPY_TTL: only a round with nothing after that means the queues are empty.
            if not any(worked) and not adding.is_set() and time.monotonic() > settled[0]:
                return

    settled = [float('inf')]

    def operator_adds_more():
        try:
            for i in range(20):
                subprocess.run(xhs_command() + ['--db', server.db, 'tasks', 'add-release',
                                                '--content', '追加笔记 %d' % i], check=True, capture_output=True)
        finally:
            settled[0] = time.monotonic() + models.COPY_TTL + 0.5
            adding.clear()

    adding.set()
    extra = threading.Thread(target=operator_adds_more)
    extra.start()
    run_threads(PHONES, phone)
    extra.join()

    for kind, total in (('release', 1020), ('reply', 200), ('comment', 200)):
        assert len(owners[kind]) == total, kind
        assert all(len(phones) == 1 for phones in owners[kind].values()), kind
    assert all(count == 1 for count in done.values())
    tasks = operator.json('tasks', 'list', '--limit', '5000')
    assert Counter((t['kind'], t['status']) for t in tasks) == {
        ('release', 'done'): 1020, ('reply', 'done'): 200, ('comment_reply', 'done'): 200}
    replies = {t['id']: t['phone'] for t in tasks if t['kind'] == 'reply'}
    assert all(replies[task_id] == 'P-%02d' % phones.pop() for task_id, phones in owners['reply'].items())
    bound = [number for number in numbers.values() if number]
    assert len(bound) == 100 and len(set(bound)) == 100
    assert len(profiles) == 100 and len(set(profiles)) == 100


def write_logs(server, stop, latencies):
    i = 0
    while not stop.is_set():
        started = time.monotonic()
        assert server.call('/xhs_phone_log/add', dict(sim(1), log_msg='写入 %d' % i))['code'] == 200
        latencies.append(time.monotonic() - started)
        i += 1


def test_backup_and_pruning_under_write_load_keep_phones_served(live, tmp_path):
    server = live()
    seeded = sqlite3.connect(server.db)
    old = time.time() - 90 * 86400
    seeded.executemany('INSERT INTO log (at, msg) VALUES (?, ?)', ((old, 'old %d' % i) for i in range(60000)))
    seeded.commit()
    seeded.close()
    stop, latencies = threading.Event(), []
    writers = [threading.Thread(target=write_logs, args=(server, stop, latencies)) for _ in range(3)]
    for thread in writers:
        thread.start()
    try:
        time.sleep(0.5)
        backup = str(tmp_path / 'copy.db')
        server.cli('backup', backup)
        pruned = server.cli('logs', 'prune', '--before', '30d').stdout
    finally:
        stop.set()
        for thread in writers:
            thread.join()
    assert 'deleted 60000 log lines' in pruned
    copy = sqlite3.connect(backup)
    assert copy.execute('PRAGMA integrity_check').fetchone()[0] == 'ok'
    assert copy.execute("SELECT COUNT(*) FROM log WHERE msg LIKE 'old %'").fetchone()[0] == 60000
    copy.close()
    assert len(latencies) > 100 and max(latencies) < 2.5, (len(latencies), max(latencies))
    live_db = sqlite3.connect(server.db)
    assert live_db.execute("SELECT COUNT(*) FROM log WHERE msg LIKE 'old %'").fetchone()[0] == 0
    assert live_db.execute("SELECT COUNT(*) FROM log WHERE msg LIKE '写入 %'").fetchone()[0] == len(latencies)
    live_db.close()


def test_screenshot_retention_removes_old_files_and_keeps_the_rest(live, tmp_path):
    server = live()
    keys = []
    for i in range(6):
        data = png_like(os.urandom(5000))
        body = server.call('/xiaohongshu_direct_essages/save_screenshots', dict(
            sim(1), name='客户%d' % i, img_base64_data=base64.b64encode(data).decode()))
        keys.append(body['data']['key'].rsplit('/', 1)[1])
    image = tmp_path / 'cover.png'
    image.write_bytes(png_like(os.urandom(3000)))
    server.cli('tasks', 'add-release', '--content', '带图笔记', '--image', image)
    aged = sqlite3.connect(server.db)
    aged.execute('UPDATE screenshot SET created_at = ? WHERE image_id IN '
                 '(SELECT id FROM image WHERE name IN (?, ?, ?))', (time.time() - 40 * 86400, *keys[:3]))
    aged.commit()
    aged.close()
    server.cli('settings', 'screenshot_retention_days', '30')
    said = server.cli('screenshots', 'prune').stdout
    assert 'deleted 3 screenshots' in said
    media = set(os.listdir(os.path.join(os.path.dirname(server.db), 'media')))
    assert media.isdisjoint(keys[:3]) and set(keys[3:]) <= media and len(media) == 4
    poll = server.call('/xiaohongshu_biji/get_release_task', sim(1), method='GET')
    assert poll['data']['images'][0].rsplit('/', 1)[1] in media
