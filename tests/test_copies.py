"""The server finds phones in a copy of the phone table (models.Copy): its own
writes show at once, other processes' within COPY_TTL, and no write is lost to a
copy read while it committed."""
import json
import threading
import time

import models
from conftest import PHONE_A, PHONE_B

WORK_STATUS = '/xhs_phone_management/get_phone_work_status'
RELEASE = '/xiaohongshu_biji/get_release_task'
READING = '/xiaohongshu_userprofile/update_reading_update_time'
UPDATED_TODAY = '/xiaohongshu_userprofile/check_updated_today'
STATUS = dict(PHONE_A, phone_type='2')


OFFLINE = '已被设为离线'


def offline_flag(app):
    """Whether the watchdog poll says the phone was set offline (registering it first)."""
    app.ok(RELEASE, PHONE_A)
    return app.ok(WORK_STATUS, STATUS)['data']['reason'] == OFFLINE


def task_ids(text):
    return [task['id'] for task in json.loads(text)]


def test_polls_are_answered_from_the_copy_once_it_is_read(app):
    assert app.ok(RELEASE, PHONE_A)['data'] == {}   # registers the phone
    assert offline_flag(app) is False
    by_sim, _, by_id = models.COPIES['phone'].current[1]
    phone_id = by_sim[PHONE_A['imsi'], PHONE_A['iccid']][0]
    assert by_id[phone_id][models.PHONE_COLUMNS.index('offline')] == 0
    assert models.COPIES['task'].current is not None


def test_the_servers_own_writes_show_at_the_next_request(app):
    assert app.ok(UPDATED_TODAY, PHONE_A)['data']['flag'] is True
    assert models.COPIES['phone'].current is not None
    app.ok(READING, PHONE_A, method='POST', encoding='form')
    assert models.COPIES['phone'].current is None   # dropped by the write
    assert app.ok(UPDATED_TODAY, PHONE_A)['data']['flag'] is False


def test_operator_changes_in_the_same_process_show_at_once(app, ok_run):
    ok_run('phones', 'add', '--imsi', PHONE_A['imsi'], '--iccid', PHONE_A['iccid'], '--label', 'A-01')
    assert offline_flag(app) is False and app.ok(RELEASE, PHONE_A)['data'] == {}
    ok_run('phones', 'set', 'A-01', '--offline')
    assert offline_flag(app) is True
    ok_run('phones', 'set', 'A-01', '--online')
    ok_run('tasks', 'add-release', '--content', '新笔记')
    [task] = task_ids(ok_run('tasks', 'list', '--json').output)
    assert app.ok(RELEASE, PHONE_A)['data']['id'] == task
    # The claimed task is this phone's until it is reported: asked again, it comes again.
    assert app.ok(RELEASE, PHONE_A)['data']['id'] == task
    assert app.ok(RELEASE, PHONE_B)['data'] == {}


def read_then(copy, action):
    """copy.get(), with `action` run right after its read of the table (so the read
    can't show what `action` does) and before the copy is kept."""
    read = copy.load

    def read_then_act():
        found = read()
        action()
        return found
    copy.load = read_then_act
    try:
        return copy.get()
    finally:
        copy.load = read


def test_a_copy_read_while_a_write_commits_is_not_kept(app):
    assert offline_flag(app) is False
    copy = models.COPIES['phone']
    phone_id = models.find_phone_by_sim(PHONE_A['imsi'], PHONE_A['iccid'])['id']
    copy.drop()
    write = (lambda: models.db.execute_sql('UPDATE phone SET offline = 1 WHERE id = ?', (phone_id,)))
    assert read_then(copy, write) is None   # the read is older than the write: not kept
    assert copy.current is None
    assert offline_flag(app) is True


def test_an_activity_stamp_made_while_the_copy_is_read_is_kept(app, monkeypatch):
    at = time.time()
    monkeypatch.setattr(models, 'now', lambda: at)
    assert offline_flag(app) is False
    copy = models.COPIES['phone']
    phone = models.find_phone_by_sim(PHONE_A['imsi'], PHONE_A['iccid'])
    copy.drop()
    at += models.ACTIVITY_STAMP_SECONDS + 1
    by_id = read_then(copy, lambda: models.touch(phone))[2]
    assert by_id[phone['id']][models.PHONE_COLUMNS.index('last_seen')] == at
    assert app.ok(WORK_STATUS, STATUS)['data']['last_seen'] == models.fmt_time(at)


def test_a_write_in_a_transaction_drops_the_copy_when_it_commits(app):
    assert offline_flag(app) is False
    copy = models.COPIES['phone']
    seen = []

    def read_copy():   # another thread reads the copy while the transaction is open
        copy.drop()
        by_sim = copy.get()[0]
        seen.append(by_sim[PHONE_A['imsi'], PHONE_A['iccid']][models.PHONE_COLUMNS.index('offline')])
    with models.db.immediate():
        models.db.execute_sql('UPDATE phone SET offline = 1 WHERE imsi = ?', (PHONE_A['imsi'],))
        reader = threading.Thread(target=read_copy)
        reader.start()
        reader.join()
        assert seen == [0] and copy.current is not None   # not committed: the copy holds what is
    assert copy.current is None
    assert offline_flag(app) is True


def test_activity_stamps_patch_the_copy_instead_of_dropping_it(app, monkeypatch):
    at = time.time()
    monkeypatch.setattr(models, 'now', lambda: at)
    assert offline_flag(app) is False
    app.ok(RELEASE, PHONE_A)
    loaded = models.COPIES['phone'].current
    row = models.db.execute_sql('SELECT id, last_seen FROM phone').fetchone()
    assert row[1] == at
    at += models.ACTIVITY_STAMP_SECONDS + 1
    app.ok(RELEASE, PHONE_A)
    stamped = models.db.execute_sql('SELECT last_seen FROM phone').fetchone()[0]
    assert stamped == at
    assert models.COPIES['phone'].current is loaded   # the same copy, patched
    assert loaded[1][2][row[0]][models.PHONE_COLUMNS.index('last_seen')] == at
    assert app.ok(WORK_STATUS, STATUS)['data']['last_seen'] == models.fmt_time(at)


def test_cli_changes_reach_a_running_server_within_the_copy_ttl(live):
    server = live()
    assert server.call(RELEASE, PHONE_A)['msg'] == '当前无任务'
    server.cli('phones', 'set', PHONE_A['imsi'], '--offline')
    changed = time.monotonic()
    while server.call(WORK_STATUS, STATUS)['data']['reason'] != '已被设为离线':
        assert time.monotonic() - changed < models.COPY_TTL + 1, 'still online'
        time.sleep(0.02)
    server.cli('phones', 'set', PHONE_A['imsi'], '--online')
    server.cli('tasks', 'add-release', '--content', '新笔记')
    changed = time.monotonic()
    while server.call(RELEASE, PHONE_A)['data'] == {}:
        assert time.monotonic() - changed < models.COPY_TTL + 1, 'task not handed out'
        time.sleep(0.02)
    listed = json.loads(server.cli('tasks', 'list', '--json').stdout)
    assert [task['status'] for task in listed] == ['claimed']
