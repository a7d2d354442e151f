"""The operator's command line (CLI.md), through click's CliRunner.

Phone activity, where a test needs it, goes through the webtest app; state the
phones cannot produce (activity events) is written through the models.
`comments ...` and `serve` are covered elsewhere (serve only for a bad --allow).
"""
import datetime
import json
import os
import re
import shutil
import sqlite3
import subprocess
import time

import click
import pytest
from click.testing import CliRunner

import cli
import models
import xhs_server
from conftest import PHONE_A, PHONE_B, SAMPLES, xhs_command

PHONE_C = {'imsi': '460011234567803', 'iccid': '89860112345678901203'}
NOTE_URL = 'https://www.xiaohongshu.com/explore/64b0c0ffee0000000000000a'
HOST_URL = 'http://192.168.1.10:8000'   # the Host header the phone sends (set per request)
TIME_RE = re.compile(r'^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d$')


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------

def lines_of(text):
    return [line for line in text.splitlines() if line.strip()]


def one_line(result):
    """The single line a successful change prints on stdout."""
    assert result.exit_code == 0, (result.stdout, result.stderr)
    lines = lines_of(result.stdout)
    assert len(lines) == 1, result.stdout
    return lines[0]


def assert_one_line_error(result, *needles):
    """Non-zero exit, no traceback, exactly one line on stderr, nothing on stdout."""
    assert result.exit_code != 0, (result.stdout, result.stderr)
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert 'Traceback' not in result.output
    assert result.stdout == '', result.stdout
    lines = lines_of(result.stderr)
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def json_of(result):
    """The one JSON value on stdout (json.loads fails on anything else)."""
    assert result.exit_code == 0, (result.stdout, result.stderr)
    return json.loads(result.stdout)


def snapshot(db_path):
    """Every row of every table, and the media folder: to prove nothing was written."""
    con = sqlite3.connect(db_path)
    try:
        tables = [row[0] for row in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        rows = {table: sorted(map(repr, con.execute('SELECT * FROM "%s"' % table))) for table in tables}
    finally:
        con.close()
    return rows, sorted(os.listdir(models.media_dir()))


def epoch_of(iso):
    return datetime.datetime.fromisoformat(iso).timestamp()


def local(ts):
    return time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(ts))


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text, encoding='utf-8')
    return str(path)


def phone_call(app, path, phone, **params):
    return app.ok(path, dict(phone, **params))


def release_for(app, phone):
    return phone_call(app, '/xiaohongshu_biji/get_release_task', phone)


def publish(app, phone, task_id, url=NOTE_URL):
    phone_call(app, '/xiaohongshu_biji/upload_url', phone, task_id=task_id, url=url)


def phone_log(app, phone, msg):
    phone_call(app, '/xhs_phone_log/add', phone, log_msg=msg)


def task_id_of(result, kind='release'):
    match = re.fullmatch(r'%s task (\d+) queued( for \S+)?' % kind, one_line(result))
    assert match, result.stdout
    return int(match.group(1))


def add_release(ok_run, content, *extra):
    return task_id_of(ok_run('tasks', 'add-release', '--content', content, *extra))


def add_phones(ok_run, *which):
    for label, phone in which:
        ok_run('phones', 'add', '--imsi', phone['imsi'], '--iccid', phone['iccid'], '--label', label)


def all_command_paths(group=cli.main, prefix=()):
    paths = []
    for name, command in sorted(group.commands.items()):
        paths.append(prefix + (name,))
        if isinstance(command, click.Group):
            paths.extend(all_command_paths(command, prefix + (name,)))
    return paths


# --------------------------------------------------------------------------
# A populated studio, shared by the list, table and mistake tests
# --------------------------------------------------------------------------

class World:
    pass


@pytest.fixture
def world(ok_run, app):
    """Phones A-01 (active) and B-02, numbers (one bound to A), profiles, codes,
    a done, a claimed, a cancelled and a targeted release task, a DM reply, logs,
    and A's activity events."""
    w = World()
    add_phones(ok_run, ('A-01', PHONE_A), ('B-02', PHONE_B))
    ok_run('numbers', 'import', os.path.join(SAMPLES, 'numbers.txt'))
    ok_run('profiles', 'import', os.path.join(SAMPLES, 'profiles.csv'))
    w.done = add_release(ok_run, 'note one')
    assert release_for(app, PHONE_A)['data']['id'] == w.done
    publish(app, PHONE_A, w.done)
    w.claimed = add_release(ok_run, 'note two')
    assert release_for(app, PHONE_A)['data']['id'] == w.claimed
    w.reply = task_id_of(ok_run('tasks', 'add-reply', '--phone', 'A-01', '--name', 'fan',
                                '--msg', 'hello'), 'reply')
    w.for_b = add_release(ok_run, 'note for b', '--phone', 'B-02')
    w.cancelled = add_release(ok_run, 'note withdrawn')
    ok_run('tasks', 'cancel', w.cancelled)
    assert phone_call(app, '/xhs_phone_management/get_phone_number', PHONE_A)['data'] == {
        'phone_number': '13900000001'}
    ok_run('codes', 'add', '13900000002', '604213')
    phone_log(app, PHONE_A, 'hello log')
    a_id = models.resolve_phone('A-01').id
    models.PhoneEvent.create(phone=a_id, event='inactive', at=time.time() - 600)
    models.PhoneEvent.create(phone=a_id, event='active', at=time.time() - 60)
    return w


# --------------------------------------------------------------------------
# Help, database selection
# --------------------------------------------------------------------------

@pytest.mark.parametrize('path', all_command_paths(), ids=' '.join)
def test_every_command_has_help_with_an_example_line(path):
    result = CliRunner().invoke(cli.main, list(path) + ['--help'])
    assert result.exit_code == 0, result.output
    text = result.stdout
    assert text.startswith('Usage: ')
    assert lines_of(text)[1].strip(), text   # a description under the usage line
    examples = [line.strip() for line in text.splitlines() if line.strip().startswith('Example:')]
    assert any(example.startswith('Example: xhs-server ' + ' '.join(path)) for example in examples), text


def test_help_covers_every_contract_command():
    paths = {' '.join(path) for path in all_command_paths()}
    assert {'status', 'phones add', 'phones list', 'phones set', 'phones history', 'numbers import',
            'numbers list', 'codes add', 'codes list', 'profiles import', 'profiles list',
            'tasks add-release', 'tasks import', 'tasks add-reply', 'tasks list', 'tasks requeue',
            'tasks cancel', 'logs', 'logs prune', 'settings', 'audit', 'backup', 'serve'} <= paths


def registered_in(path):
    con = sqlite3.connect(path)
    try:
        return [row[0] for row in con.execute('SELECT label FROM phone ORDER BY id')]
    finally:
        con.close()


def test_db_option_chooses_the_database_file(tmp_path, db_path):
    other = str(tmp_path / 'elsewhere' / 'studio.db')
    result = CliRunner().invoke(cli.main, ['--db', other, 'phones', 'add', '--imsi', PHONE_A['imsi'],
                                           '--iccid', PHONE_A['iccid'], '--label', 'A-01'])
    assert one_line(result) == 'added phone A-01 (id 1)'
    assert registered_in(other) == ['A-01']
    assert registered_in(db_path) == []
    assert models.media_dir() == str(tmp_path / 'elsewhere' / 'media')


def test_xhs_db_environment_chooses_the_database_and_db_option_overrides_it(tmp_path, db_path):
    env_db = str(tmp_path / 'env' / 'studio.db')
    runner = CliRunner(env={'XHS_DB': env_db})
    result = runner.invoke(cli.main, ['phones', 'add', '--imsi', PHONE_A['imsi'],
                                      '--iccid', PHONE_A['iccid'], '--label', 'A-01'])
    assert one_line(result) == 'added phone A-01 (id 1)'
    assert registered_in(env_db) == ['A-01']
    assert registered_in(db_path) == []
    listed = json_of(runner.invoke(cli.main, ['phones', 'list', '--json']))
    assert [row['label'] for row in listed] == ['A-01']
    assert json_of(runner.invoke(cli.main, ['--db', db_path, 'phones', 'list', '--json'])) == []


def unusable_db(tmp_path, problem):
    """A --db path that cannot be used, and what must stay as it was."""
    if problem == 'folder-cannot-be-created':
        blocker = tmp_path / 'a-file'
        blocker.write_text('not a folder')
        return str(blocker / 'sub' / 'x.db'), blocker
    if problem == 'not-a-database':
        junk = tmp_path / 'junk.db'
        junk.write_bytes(b'this is not an SQLite database\n' * 200)
        return str(junk), junk
    folder = tmp_path / 'a-folder.db'
    folder.mkdir()
    return str(folder), None


@pytest.mark.parametrize('problem', ['folder-cannot-be-created', 'not-a-database', 'a-directory'])
@pytest.mark.parametrize('args', [('status',), ('phones', 'list'), ('numbers', 'import', 'ignored.txt')],
                         ids=' '.join)
def test_unusable_db_is_a_one_line_error(tmp_path, db_path, problem, args):
    path, keep = unusable_db(tmp_path, problem)
    content = keep.read_bytes() if keep else None
    result = CliRunner().invoke(cli.main, ['--db', path] + list(args))
    line = assert_one_line_error(result, 'cannot open database')
    assert os.path.basename(path) in line
    if keep:
        assert keep.read_bytes() == content


# --------------------------------------------------------------------------
# status
# --------------------------------------------------------------------------

@pytest.fixture
def known_state(ok_run, app):
    """3 phones (A active, B offline, C never seen); release tasks 1 of each state
    (the pending one due in 2h); 1 pending reply; 2 numbers, 1 bound; 2 profiles,
    1 reserved; 2 codes; 1 error line from A."""
    add_phones(ok_run, ('A-01', PHONE_A), ('B-02', PHONE_B), ('C-03', PHONE_C))
    ok_run('phones', 'set', 'B-02', '--offline')
    ok_run('numbers', 'import', os.path.join(SAMPLES, 'numbers.txt'))
    ok_run('profiles', 'import', os.path.join(SAMPLES, 'profiles.csv'))
    done_id = add_release(ok_run, 'published')
    assert release_for(app, PHONE_A)['data']['id'] == done_id
    publish(app, PHONE_A, done_id)
    claimed = add_release(ok_run, 'being published')
    assert release_for(app, PHONE_A)['data']['id'] == claimed
    add_release(ok_run, 'later', '--at', '+2h')
    ok_run('tasks', 'cancel', add_release(ok_run, 'withdrawn'))
    ok_run('tasks', 'add-reply', '--phone', 'A-01', '--name', 'fan', '--msg', 'hi')
    phone_call(app, '/xhs_phone_management/get_phone_number', PHONE_A)
    phone_call(app, '/xhs_phone_management/get_xhs_unregistered_information', PHONE_A,
               get_info_number=1)
    ok_run('codes', 'add', '13900000002', '604213')
    app.ok('/sms/receive', {'phone_number': '13900000001', 'content': '【小红书】验证码 381904，5分钟内有效'})
    phone_log(app, PHONE_A, '发布失败: 网络超时')


def test_status_json_counts_the_known_state(known_state, run):
    result = run('status', '--json')
    data = json_of(result)
    assert data['phones'] == {'total': 3, 'active': 1, 'inactive': 1, 'offline': 1, 'unapproved': 0}
    assert data['tasks']['release'] == {'pending': 1, 'claimed': 1, 'done': 1, 'cancelled': 1}
    assert data['tasks']['reply'] == {'pending': 1, 'claimed': 0, 'done': 0, 'cancelled': 0}
    assert sum(data['tasks'].get('comment_reply', {}).values()) == 0
    assert (data['numbers'].get('free', 0), data['numbers'].get('bound', 0)) == (1, 1)
    assert (data['profiles'].get('available', 0), data['profiles'].get('reserved', 0),
            data['profiles'].get('used', 0)) == (1, 1, 0)
    assert data['codes_last_hour'] == 2 and data['codes_waiting'] == 2
    assert data['stuck_tasks'] == []
    assert [(row['phone'], row['msg']) for row in data['recent_errors']] == [('A-01', '发布失败: 网络超时')]
    assert abs(epoch_of(data['recent_errors'][0]['at']) - time.time()) < 60


def test_status_screen_shows_the_same_counts(known_state, run):
    result = run('status')
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert 'phones    3: 1 active, 1 inactive, 1 offline, 0 awaiting approval' in lines
    assert 'release   1 pending, 1 claimed, 1 done, 1 cancelled' in lines
    assert 'reply     1 pending, 0 claimed, 0 done, 0 cancelled' in lines
    assert 'numbers   1 free, 1 bound' in lines
    assert 'profiles  1 available, 1 reserved, 0 used' in lines
    assert 'codes     2 received in the last hour, 2 still valid for phones to fetch' in lines
    errors = [line for line in lines if line.startswith('error ')]
    assert len(errors) == 1 and errors[0].endswith('A-01: 发布失败: 网络超时'), errors
    assert TIME_RE.match(errors[0][10:29]), errors[0]


def test_status_of_an_empty_database_is_all_zero(run):
    data = json_of(run('status', '--json'))
    assert data['phones'] == {'total': 0, 'active': 0, 'inactive': 0, 'offline': 0, 'unapproved': 0}
    assert data['codes_last_hour'] == 0 and data['recent_errors'] == []
    assert 'phones    0: 0 active, 0 inactive, 0 offline, 0 awaiting approval' in run('status').stdout


# --------------------------------------------------------------------------
# Every list command: --json, tables with local times
# --------------------------------------------------------------------------

LIST_COMMANDS = [
    ('phones', 'list'), ('phones', 'history', 'A-01'), ('numbers', 'list'), ('codes', 'list'),
    ('profiles', 'list'), ('tasks', 'list'), ('logs',), ('settings',), ('audit',),
]


@pytest.mark.parametrize('args', LIST_COMMANDS, ids=' '.join)
def test_list_json_prints_exactly_one_json_array(world, run, args):
    result = run(*args, '--json')
    value = json_of(result)
    assert isinstance(value, list) and value and all(isinstance(row, dict) for row in value)
    assert result.stderr == ''


@pytest.mark.parametrize('args', [args for args in LIST_COMMANDS if args != ('settings',)], ids=' '.join)
def test_list_json_of_nothing_is_an_empty_array(ok_run, run, args):
    if args[:2] == ('phones', 'history'):
        add_phones(ok_run, ('A-01', PHONE_A))
    result = run(*args, '--json')
    assert json_of(result) == [] and result.stdout.strip() == '[]'


# (command, heading of the time column, JSON key of the same time)
TIME_COLUMNS = [
    (('phones', 'list'), 'LAST ACTIVITY', 'last_seen'),
    (('phones', 'history', 'A-01'), 'TIME', 'at'),
    (('numbers', 'list'), 'BOUND', 'bound_at'),
    (('codes', 'list'), 'RECEIVED', 'received_at'),
    (('tasks', 'list'), 'CLAIMED', 'claimed_at'),
    (('tasks', 'list'), 'DONE', 'done_at'),
    (('audit',), 'TIME', 'at'),
]


@pytest.mark.parametrize('args,heading,key', TIME_COLUMNS,
                         ids=['%s %s' % (' '.join(args[:2]), heading) for args, heading, _ in TIME_COLUMNS])
def test_tables_show_aligned_local_times(world, run, args, heading, key):
    rows = json_of(run(*args, '--json'))
    expected = [local(epoch_of(row[key])) if row[key] else '-' for row in rows]
    assert any(value != '-' for value in expected)
    result = run(*args)
    assert result.exit_code == 0
    table = result.stdout.splitlines()
    header, body = table[0], table[1:]
    assert len(body) == len(rows), result.stdout
    columns = {match.group(): match.start() for match in re.finditer(r'\S+(?: \S+)*', header)}
    start, starts = columns[heading], sorted(columns.values())
    for line, value in zip(body, expected):
        cell = line[start:start + len(value)]
        assert cell == value, (line, value)
        assert start == 0 or line[start - 2:start] == '  ', line
        assert line[start + len(value):start + len(value) + 2].strip() == '', line
        if value != '-':
            assert TIME_RE.match(cell)
            assert abs(time.mktime(time.strptime(cell, '%Y-%m-%d %H:%M:%S')) - time.time()) < 3600
        for column in starts:   # every column starts where its heading does
            if column < len(line) and column > 0:
                assert line[column - 1] == ' ', (line, column)


def test_logs_lines_start_with_the_local_time_and_phone(world, run):
    rows = json_of(run('logs', '--json'))
    assert [row['msg'] for row in rows] == ['hello log']
    line, = run('logs').stdout.splitlines()
    day, clock, phone, msg = line.split(None, 3)
    assert ('%s %s' % (day, clock), phone, msg) == (local(epoch_of(rows[0]['at'])), 'A-01', 'hello log')


# --------------------------------------------------------------------------
# phones
# --------------------------------------------------------------------------

def test_phones_add_registers_a_phone_before_its_first_request(ok_run, run, app):
    result = ok_run('phones', 'add', '--imsi', PHONE_A['imsi'], '--iccid', PHONE_A['iccid'],
                    '--label', 'A-01', '--mac', 'AA-BB-CC-DD-EE-01', '--type', '1')
    assert one_line(result) == 'added phone A-01 (id 1)'
    task = add_release(ok_run, 'only for A', '--phone', 'A-01')
    expected = {
        'label': 'A-01', 'id': 1, 'imsi': PHONE_A['imsi'], 'iccid': PHONE_A['iccid'],
        'mac': 'aa:bb:cc:dd:ee:01', 'type': 1, 'account': None, 'number': None,
        'last_seen': None, 'active': False, 'offline': False, 'approved': True}
    row, = json_of(run('phones', 'list', '--json'))
    assert {key: row[key] for key in expected} == expected
    assert release_for(app, PHONE_B)['msg'] == '当前无任务'
    assert release_for(app, PHONE_A)['data']['id'] == task
    rows = json_of(run('phones', 'list', '--json'))
    # B, unknown to the operator, registered itself with its first request
    assert [(row['label'], row['imsi'], row['active']) for row in rows] == [
        ('A-01', PHONE_A['imsi'], True), (None, PHONE_B['imsi'], True)]


def test_phones_list_table_has_a_row_per_phone(ok_run, run):
    add_phones(ok_run, ('A-01', PHONE_A), ('B-02', PHONE_B))
    header, *rows = run('phones', 'list').stdout.splitlines()
    assert header.split() == ['LABEL', 'ID', 'IMSI', 'ICCID', 'MAC', 'TYPE', 'ACCOUNT', 'NUMBER',
                              'LAST', 'ACTIVITY', 'ACTIVE', 'OFFLINE', 'APPROVED']
    assert [row.split()[:4] for row in rows] == [['A-01', '1'] + list(PHONE_A.values()),
                                                 ['B-02', '2'] + list(PHONE_B.values())]


@pytest.mark.parametrize('ref', ['A-01', 'id', PHONE_A['imsi'], PHONE_A['iccid']])
def test_a_phone_is_named_by_label_id_imsi_or_iccid(ok_run, run, ref):
    add_phones(ok_run, ('B-02', PHONE_B), ('A-01', PHONE_A))
    if ref == 'id':
        ref = str(models.resolve_phone('A-01').id)
    assert re.fullmatch(r'phone A-01: rest_day \S+ -> 7', one_line(ok_run('phones', 'set', ref, '--rest-day', '7')))
    rows = {row['label']: row['rest_day'] for row in json_of(run('phones', 'list', '--json'))}
    assert rows == {'A-01': 7, 'B-02': None}


def test_phones_set_rest_sets_day_and_night_and_the_phone_is_told(ok_run, run, app):
    add_phones(ok_run, ('A-01', PHONE_A))
    line = one_line(ok_run('phones', 'set', 'A-01', '--rest', '45'))
    assert re.fullmatch(r'phone A-01: rest_day \S+ -> 45, rest_night \S+ -> 45', line), line
    row, = json_of(run('phones', 'list', '--json'))
    assert (row['rest_day'], row['rest_night']) == (45, 45)
    told = phone_call(app, '/xiaohongshu_direct_essages/get_screenshot_time', PHONE_A)
    assert told['data'] == {'screenshot_time': 45}


def test_phones_set_rest_day_and_rest_night_separately(ok_run, run):
    add_phones(ok_run, ('A-01', PHONE_A))
    ok_run('phones', 'set', 'A-01', '--rest', '30')
    assert one_line(ok_run('phones', 'set', 'A-01', '--rest-night', '200')) == \
        'phone A-01: rest_night 30 -> 200'
    row, = json_of(run('phones', 'list', '--json'))
    assert (row['rest_day'], row['rest_night']) == (30, 200)


def test_phones_set_label_renames_the_phone(ok_run, run):
    add_phones(ok_run, ('A-01', PHONE_A))
    assert one_line(ok_run('phones', 'set', 'A-01', '--label', 'A-99')) == 'phone A-01: label A-01 -> A-99'
    assert [row['label'] for row in json_of(run('phones', 'list', '--json'))] == ['A-99']
    assert_one_line_error(run('phones', 'set', 'A-01', '--offline'), 'phones add')


def test_phones_set_offline_stops_release_tasks_and_online_resumes_them(ok_run, run, app):
    add_phones(ok_run, ('A-01', PHONE_A))
    task = add_release(ok_run, 'wait for me')
    assert one_line(ok_run('phones', 'set', 'A-01', '--offline')) == 'phone A-01: offline False -> True'
    assert release_for(app, PHONE_A) == {'code': 200, 'msg': '当前无任务', 'data': {}, 'note': {}}
    assert json_of(run('tasks', 'list', '--json'))[0]['status'] == 'pending'
    status = phone_call(app, '/xhs_phone_management/get_phone_work_status', PHONE_A, phone_type=2)
    assert status['data']['flag'] is True
    assert one_line(ok_run('phones', 'set', 'A-01', '--online')) == 'phone A-01: offline True -> False'
    assert release_for(app, PHONE_A)['data']['id'] == task


def test_phones_set_approve_lets_a_waiting_phone_work(ok_run, run, app):
    xhs_server.configure(approve_new=True)
    try:
        assert app.call('/xiaohongshu_biji/get_release_task', PHONE_A)['code'] == 403
        row, = json_of(run('phones', 'list', '--json'))
        assert row['approved'] is False
        assert json_of(run('status', '--json'))['phones']['unapproved'] == 1
        line = one_line(ok_run('phones', 'set', PHONE_A['iccid'], '--approve'))
        assert line == 'phone %s: approved False -> True' % PHONE_A['imsi']
        assert release_for(app, PHONE_A)['msg'] == '当前无任务'
    finally:
        xhs_server.configure()


def test_phones_set_refresh_profile_asks_the_phone_to_report_again(ok_run, app):
    add_phones(ok_run, ('A-01', PHONE_A))
    phone_call(app, '/xiaohongshu_userprofile/update_userinfo', PHONE_A, phone_num='13900000001',
               name='小美的日常', xiaohongshu_id='95012345678', home_url='https://xhs.example/u/1',
               macaddr='aa:bb:cc:dd:ee:01', platform=1)
    ask = '/xiaohongshu_userprofile/is_update_userinfo'
    assert phone_call(app, ask, PHONE_A)['data'] == {'is_update': False}
    assert one_line(ok_run('phones', 'set', 'A-01', '--refresh-profile')) == \
        'phone A-01: refresh_profile False -> True'
    assert phone_call(app, ask, PHONE_A)['data'] == {'is_update': True}


def test_phones_history_lists_quiet_and_back_events_oldest_first(world, run):
    rows = json_of(run('phones', 'history', 'A-01', '--json'))
    assert [row['event'] for row in rows] == ['inactive', 'active']
    assert epoch_of(rows[0]['at']) < epoch_of(rows[1]['at'])
    assert json_of(run('phones', 'history', 'B-02', '--json')) == []
    assert run('phones', 'history', 'B-02').stdout == '(none)\n'


UNKNOWN_PHONE_COMMANDS = [
    ('phones', 'set', 'Z-99', '--offline'),
    ('phones', 'history', 'Z-99'),
    ('tasks', 'add-release', '--content', 'x', '--phone', 'Z-99'),
    ('tasks', 'add-reply', '--phone', 'Z-99', '--name', 'fan', '--msg', 'hi'),
    ('tasks', 'list', '--phone', 'Z-99'),
    ('logs', '--phone', 'Z-99'),
]


@pytest.mark.parametrize('args', UNKNOWN_PHONE_COMMANDS, ids=' '.join)
def test_naming_an_unknown_phone_fails_with_a_hint_to_add_it(world, run, db_path, args):
    before = snapshot(db_path)
    line = assert_one_line_error(run(*args), 'Z-99', 'phones add')
    assert line.startswith('Error: ')
    assert snapshot(db_path) == before


# --------------------------------------------------------------------------
# Operator mistakes: one line, no traceback, nothing written
# --------------------------------------------------------------------------

NOT_AN_IMAGE = os.path.join(SAMPLES, 'README.md')
NOTE_JPG = os.path.join(SAMPLES, 'note.jpg')

MISTAKES = [
    ('bad-at', ('tasks', 'add-release', '--content', 'x', '--at', 'tomorrow evening'), 'tomorrow evening'),
    ('missing-image', ('tasks', 'add-release', '--content', 'x', '--image', '/no/such/cup.jpg'), 'cup.jpg'),
    ('non-image-file', ('tasks', 'add-release', '--content', 'x', '--image', NOT_AN_IMAGE), 'README.md'),
    ('good-then-missing-image', ('tasks', 'add-release', '--content', 'x', '--image', NOTE_JPG,
                                 '--image', '/no/such/cup.jpg'), 'cup.jpg'),
    ('image-folder', ('tasks', 'add-release', '--content', 'x', '--image', SAMPLES), 'samples'),
    ('phone-and-account', ('tasks', 'add-release', '--content', 'x', '--phone', 'A-01',
                           '--account', '95012345678'), '--account'),
    ('bad-cidr', ('serve', '--port', '0', '--allow', '10.0.0.300/33'), '10.0.0.300/33'),
    ('duplicate-label-add', ('phones', 'add', '--imsi', PHONE_C['imsi'], '--iccid', PHONE_C['iccid'],
                             '--label', 'A-01'), 'A-01'),
    ('duplicate-label-set', ('phones', 'set', 'B-02', '--label', 'A-01'), 'A-01'),
    ('same-sim-twice', ('phones', 'add', '--imsi', PHONE_A['imsi'], '--iccid', PHONE_A['iccid']),
     PHONE_A['imsi']),
    ('bad-imsi', ('phones', 'add', '--imsi', '46001-12', '--iccid', PHONE_C['iccid']), '--imsi'),
    ('bad-mac', ('phones', 'add', '--imsi', PHONE_C['imsi'], '--iccid', PHONE_C['iccid'],
                 '--mac', 'not-a-mac'), 'not-a-mac'),
    ('nothing-to-change', ('phones', 'set', 'A-01'), 'nothing to change'),
    ('requeue-unknown', ('tasks', 'requeue', '999'), '999'),
    ('cancel-unknown', ('tasks', 'cancel', '999'), '999'),
    ('cancel-done', ('tasks', 'cancel', 'DONE'), 'already done'),
    ('requeue-done', ('tasks', 'requeue', 'DONE'), 'already done'),
    ('empty-reply', ('tasks', 'add-reply', '--phone', 'A-01', '--name', ' ', '--msg', 'hi'), 'empty'),
    ('bad-number', ('codes', 'add', '12-ab', '604213'), '12-ab'),
    ('bad-code', ('codes', 'add', '13900000001', '60'), 'CODE'),
    ('bad-setting-key', ('settings', 'rest_weekend', '30'), 'rest_weekend'),
    ('bad-setting-value', ('settings', 'rest_day', 'lots'), 'rest_day'),
    ('negative-setting', ('settings', 'rest_day', '--', '-5'), 'from 0 to 1440'),
    ('bad-since', ('logs', '--since', 'last week'), 'last week'),
    ('bad-prune-before', ('logs', 'prune', '--before', 'ages ago'), 'ages ago'),
]


@pytest.mark.parametrize('args,needle', [case[1:] for case in MISTAKES], ids=[case[0] for case in MISTAKES])
def test_operator_mistake_is_one_line_with_nothing_written(world, run, db_path, monkeypatch, args, needle):
    monkeypatch.setattr(xhs_server, 'make_server', lambda *a, **k: pytest.fail('serve started'))
    args = [str(world.done) if arg == 'DONE' else arg for arg in args]
    before = snapshot(db_path)
    assert_one_line_error(run(*args), needle)
    assert snapshot(db_path) == before


# --------------------------------------------------------------------------
# Changes say in one line what changed
# --------------------------------------------------------------------------

CHANGES = [
    (('phones', 'add', '--imsi', PHONE_C['imsi'], '--iccid', PHONE_C['iccid'], '--label', 'C-03'),
     r'added phone C-03 \(id 3\)'),
    (('phones', 'set', 'B-02', '--offline', '--rest-day', '5'),
     r'phone B-02: offline False -> True, rest_day \S+ -> 5'),
    (('codes', 'add', '+86 139-0000-0001', '123456'), r'code added for 139\*\*\*\*0001'),
    (('tasks', 'add-release', '--content', 'new note'), r'release task \d+ queued'),
    (('tasks', 'add-reply', '--phone', 'B-02', '--name', 'fan', '--msg', 'thanks'),
     r'reply task \d+ queued for B-02'),
    (('tasks', 'requeue', 'CLAIMED'), r'release task \d+ requeued \(was claimed\)'),
    (('tasks', 'cancel', 'REPLY'), r'reply task \d+ cancelled \(was pending\)'),
    (('settings', 'rest_night', '180'), r'rest_night: 120 -> 180'),
    (('logs', 'prune', '--before', '1d'), r'deleted 0 log lines before \d{4}-\d\d-\d\d \d\d:\d\d:\d\d'),
    (('numbers', 'import', os.path.join(SAMPLES, 'numbers.txt')),
     r'imported 0 numbers from .*numbers\.txt; skipped 2 \(0 invalid, 2 duplicate\)'),
]


@pytest.mark.parametrize('args,pattern', CHANGES, ids=[' '.join(args[:2]) for args, _ in CHANGES])
def test_a_change_prints_one_line_saying_what_changed(world, run, args, pattern):
    ids = {'CLAIMED': world.claimed, 'REPLY': world.reply}
    result = run(*[str(ids.get(arg, arg)) for arg in args])
    line = one_line(result)
    assert re.fullmatch(pattern, line), line
    assert json_of(run('audit', '--json'))[-1]['change'] == line


# --------------------------------------------------------------------------
# Imports: numbers, profiles, tasks
# --------------------------------------------------------------------------

def stored(run, kind):
    if kind == 'numbers':
        return [(row['number'], row['preassigned_iccid']) for row in json_of(run('numbers', 'list', '--json'))]
    if kind == 'profiles':
        return [(row['name'], row['gender'], row['birthday'], row['platform'])
                for row in json_of(run('profiles', 'list', '--json'))]
    return [(row['content'], row['title'], row['priority'])
            for row in json_of(run('tasks', 'list', '--kind', 'release', '--json'))]


ICCID = PHONE_A['iccid']

# kind, file name, text, stored afterwards, invalid line numbers, duplicate line numbers
IMPORTS = {
    'numbers-text': (
        'numbers', 'numbers.txt',
        '13900000001\n139 0000 0002\n\nnot a number\n+8613900000001\n13900000003\n12\n',
        [('13900000001', None), ('13900000002', None), ('13900000003', None)], [4, 7], [5]),
    'numbers-csv-header': (
        'numbers', 'numbers.csv',
        'phone_number,iccid\n13900000001,%s\n13900000002,\n13900000003,bad iccid!\n'
        '13900000001,%s\n13900000004,%s,extra\n' % (ICCID, ICCID, ICCID),
        [('13900000001', ICCID), ('13900000002', None)], [4, 6], [5]),
    'numbers-csv-no-header': (
        'numbers', 'numbers.csv',
        '13900000001,%s\n13900000002,%s\nabc,%s\n13900000002,%s\n' % (ICCID, PHONE_B['iccid'], ICCID, ICCID),
        [('13900000001', ICCID), ('13900000002', PHONE_B['iccid'])], [3], [4]),
    'numbers-jsonl': (
        'numbers', 'numbers.jsonl',
        '{"phone_number": "13900000001"}\n{"phone_number": "13900000002", "iccid": "%s"}\n'
        '[1, 2]\n{"phone_number": "x"}\n{"phone_number": "13900000001"}\n{broken\n' % ICCID,
        [('13900000001', None), ('13900000002', ICCID)], [3, 4, 6], [5]),
    'profiles-csv': (
        'profiles', 'profiles.csv',
        'gender_id,gender,head_portrait,birthday,name,platform\n'
        '2,女,https://a.example/1.jpg,1999-04-12,小美的日常,1\n'
        ',男,,1997-11-02,阿杰爱做饭,1\n'
        '3,?,,1990-01-01,无名,1\n'
        '1,男,,1990/01/01,日期不对,1\n'
        '1,男,,1990-01-01,,1\n'
        '2,女,,2000-02-02,小美的日常,1\n'
        '1,男,,1995-05-05,平台不对,x\n',
        [('小美的日常', '女', '1999-04-12', 1), ('阿杰爱做饭', '男', '1997-11-02', 1)], [4, 5, 6, 8], [7]),
    'profiles-jsonl': (
        'profiles', 'profiles.jsonl',
        '{"gender_id": 2, "gender": "女", "birthday": "1999-04-12", "name": "小美的日常", "platform": 2}\n'
        '{"gender": "男", "birthday": "1997-11-02", "name": "阿杰爱做饭"}\n'
        '{"gender_id": 1, "birthday": "1997-11-02"}\n'
        'not json\n'
        '{"gender_id": 1, "birthday": "1998-01-01", "name": "阿杰爱做饭"}\n',
        [('小美的日常', '女', '1999-04-12', 2), ('阿杰爱做饭', '男', '1997-11-02', 1)], [3, 4], [5]),
    'tasks-jsonl': (
        'tasks', 'release.jsonl',
        '{"content": "秋天的奶茶", "title": "奶茶", "priority": 3, "phone": "A-01"}\n'
        '{"content": "冬天的火锅", "images": ["https://img.example/1.jpg"], "topics": ["火锅"]}\n'
        'not json\n'
        '{"title": "no content"}\n'
        '{"content": "x", "phone": "Z-99"}\n'
        '{"content": "y", "priority": "high"}\n'
        '{"content": "z", "at": "someday"}\n'
        '{"content": "秋天的奶茶", "title": "奶茶", "phone": "A-01"}\n',
        [('秋天的奶茶', '奶茶', 3), ('冬天的火锅', None, 0)], [3, 4, 5, 6, 7], [8]),
    'tasks-csv-header': (
        'tasks', 'release.csv',
        'content,title,images,topics,platform,phone,at,priority\n'
        '秋天的奶茶,奶茶,https://img.example/1.jpg|https://img.example/2.jpg,秋天|奶茶,1,A-01,,2\n'
        '"多行\n正文",,,,1,,,\n'
        ',no content,,,1,,,\n'
        '秋天的奶茶,奶茶,,,1,A-01,,\n'
        'p,,,,one,,,\n',
        [('秋天的奶茶', '奶茶', 2), ('多行\n正文', None, 0)], [5, 7], [6]),
}


@pytest.mark.parametrize('case', list(IMPORTS))
def test_import_takes_good_lines_and_names_each_skipped_line(ok_run, run, tmp_path, case):
    kind, name, text, expected, invalid, duplicate = IMPORTS[case]
    add_phones(ok_run, ('A-01', PHONE_A))
    path = write(tmp_path, name, text)
    result = run(kind, 'import', path)
    assert result.exit_code == 0, result.output
    noun = {'numbers': 'numbers', 'profiles': 'profiles', 'tasks': 'release tasks'}[kind]
    assert one_line(result) == 'imported %d %s from %s; skipped %d (%d invalid, %d duplicate)' % (
        len(expected), noun, path, len(invalid) + len(duplicate), len(invalid), len(duplicate))
    skipped = lines_of(result.stderr)
    assert [int(re.match(r'line (\d+): skipped, ', line).group(1)) for line in skipped] == \
        sorted(invalid + duplicate), result.stderr
    for line in skipped:
        number = int(re.match(r'line (\d+)', line).group(1))
        assert ('duplicate' in line) == (number in duplicate), line
    assert stored(run, kind) == expected


def test_import_names_the_first_of_two_equal_lines(run, tmp_path):
    result = run('numbers', 'import', write(tmp_path, 'n.txt', '13900000001\n13900000002\n13900000001\n'))
    assert lines_of(result.stderr) == ['line 3: skipped, duplicate: same as line 1']


# kind, first file, second file (overlapping), line numbers of the second already stored, new rows
AGAIN = {
    'numbers': ('13900000001\n13900000002\n', '13900000003\n+86 139 0000 0002\n13900000001\n', [2, 3], 1),
    'profiles': ('{"gender_id": 1, "birthday": "1990-01-01", "name": "甲"}\n',
                 '{"gender_id": 2, "birthday": "1991-01-01", "name": "乙"}\n'
                 '{"gender_id": 2, "birthday": "1992-02-02", "name": "甲"}\n', [2], 1),
    'tasks': ('{"content": "一"}\n{"content": "二", "title": "T"}\n',
              '{"content": "二", "title": "T"}\n{"content": "二"}\n{"content": "一"}\n', [1, 3], 1),
}


@pytest.mark.parametrize('kind', list(AGAIN))
def test_import_skips_lines_already_stored(run, db_path, tmp_path, kind):
    first, second, stored_lines, new = AGAIN[kind]
    assert run(kind, 'import', write(tmp_path, 'first', first)).exit_code == 0
    before = len(stored(run, kind))
    result = run(kind, 'import', write(tmp_path, 'second', second))
    assert result.exit_code == 0, result.output
    assert lines_of(result.stderr) == ['line %d: skipped, duplicate: already stored' % n for n in stored_lines]
    assert re.match(r'imported %d ' % new, one_line(result))
    assert len(stored(run, kind)) == before + new


SAMPLE_FILES = {'numbers': 'numbers.txt', 'profiles': 'profiles.csv', 'tasks': 'release.jsonl'}


@pytest.mark.parametrize('kind', list(SAMPLE_FILES))
def test_importing_the_same_file_twice_stores_nothing_new(ok_run, run, db_path, kind):
    add_phones(ok_run, ('A-01', PHONE_A))
    path = os.path.join(SAMPLES, SAMPLE_FILES[kind])
    first = one_line(ok_run(kind, 'import', path))
    count = len(stored(run, kind))
    assert count > 0 and re.match(r'imported %d ' % count, first)
    rows_before = snapshot(db_path)[0]
    second = ok_run(kind, 'import', path)
    assert re.match(r'imported 0 .*; skipped %d \(0 invalid, %d duplicate\)$' % (count, count),
                    one_line(second)), second.stdout
    assert len(lines_of(second.stderr)) == count
    rows_after = snapshot(db_path)[0]
    rows_after.pop('audit'), rows_before.pop('audit')
    assert rows_after == rows_before


STRICT = {
    'numbers': '13900000001\n13900000002\nnope\n',
    'profiles': 'gender_id,gender,head_portrait,birthday,name,platform\n1,男,,1990-01-01,甲,1\n'
                '1,男,,yesterday,乙,1\n',
    'tasks': '{"content": "one", "images": ["%s"]}\n{"content": "two", "priority": "top"}\n'
             % os.path.join(SAMPLES, 'note.jpg'),
}


@pytest.mark.parametrize('kind', list(STRICT))
def test_import_strict_with_a_bad_line_imports_nothing(run, db_path, tmp_path, kind):
    path = write(tmp_path, 'strict.txt', STRICT[kind])
    before = snapshot(db_path)
    result = run(kind, 'import', path, '--strict')
    assert result.exit_code != 0
    assert isinstance(result.exception, SystemExit) and 'Traceback' not in result.output
    bad_line = len(STRICT[kind].splitlines())
    errors = lines_of(result.stderr)
    assert errors[0].startswith('line %d: skipped' % bad_line), result.stderr
    assert 'nothing imported' in errors[-1] and len(errors) == 2, result.stderr
    assert result.stdout == ''
    assert snapshot(db_path) == before
    assert run(kind, 'import', path, '--strict').exit_code != 0   # still refused, still nothing
    assert stored(run, kind) == []


def unreadable(tmp_path, problem):
    if problem == 'missing':
        return str(tmp_path / 'no-such-file.csv')
    if problem == 'directory':
        folder = tmp_path / 'a-folder'
        folder.mkdir()
        return str(folder)
    path = tmp_path / 'latin1.csv'
    path.write_bytes('13900000001\n13900000002,café\n'.encode('latin-1'))
    return str(path)


@pytest.mark.parametrize('problem', ['missing', 'directory', 'not-utf8'])
@pytest.mark.parametrize('kind', list(SAMPLE_FILES))
def test_import_of_an_unreadable_file_fails_importing_nothing(run, db_path, tmp_path, kind, problem):
    path = unreadable(tmp_path, problem)
    before = snapshot(db_path)
    line = assert_one_line_error(run(kind, 'import', path), os.path.basename(path))
    assert line.startswith('Error: cannot read')
    assert snapshot(db_path) == before


def test_import_of_five_thousand_numbers_takes_them_all_with_progress_on_stderr(run, tmp_path):
    path = write(tmp_path, 'many.txt', ''.join('1380000%04d\n' % n for n in range(5000)))
    started = time.monotonic()
    result = run('numbers', 'import', path)
    assert time.monotonic() - started < 15
    assert one_line(result) == 'imported 5000 numbers from %s; skipped 0 (0 invalid, 0 duplicate)' % path
    assert 'reading' in result.stderr and 'line ' not in result.stderr
    assert json_of(run('status', '--json'))['numbers'] == {'free': 5000}
    assert len(json_of(run('numbers', 'list', '--free', '--json'))) == 5000


def test_tasks_import_gives_phones_images_topics_and_targets(ok_run, app, tmp_path):
    add_phones(ok_run, ('A-01', PHONE_A), ('B-02', PHONE_B))
    ok_run('tasks', 'import', write(tmp_path, 'release.csv', IMPORTS['tasks-csv-header'][2]))
    assert release_for(app, PHONE_B)['data']['content'] == '多行\n正文'   # the A-01 task is not B's
    task = release_for(app, PHONE_A)['data']
    assert task == {'id': task['id'], 'content': '秋天的奶茶', 'title': '奶茶', 'platform': 1,
                    'images': ['https://img.example/1.jpg', 'https://img.example/2.jpg'],
                    'topics': ['秋天', '奶茶']}


def test_tasks_import_copies_local_images_and_skips_a_line_with_a_missing_one(run, app, tmp_path):
    path = write(tmp_path, 'release.jsonl',
                 '{"content": "with a picture", "images": ["%s"]}\n'
                 '{"content": "picture gone", "images": ["/no/such/cup.jpg"]}\n' % NOTE_JPG)
    result = run('tasks', 'import', path)
    assert one_line(result).startswith('imported 1 release tasks from ')
    assert len(lines_of(result.stderr)) == 1 and lines_of(result.stderr)[0].startswith('line 2: skipped, ')
    stored_files = os.listdir(models.media_dir())
    assert len(stored_files) == 1
    got = app.ok('/xiaohongshu_biji/get_release_task', PHONE_A, headers={'Host': '192.168.1.10:8000'})
    assert got['data']['images'] == ['%s/media/%s' % (HOST_URL, stored_files[0])]


def test_tasks_import_of_the_sample_queues_it_for_its_phone(ok_run, run, app):
    add_phones(ok_run, ('A-01', PHONE_A))
    line = one_line(ok_run('tasks', 'import', os.path.join(SAMPLES, 'release.jsonl')))
    assert line.startswith('imported 1 release tasks from ')
    row, = json_of(run('tasks', 'list', '--json'))
    assert (row['kind'], row['status'], row['target']) == ('release', 'pending', 'A-01')
    assert release_for(app, PHONE_B)['msg'] == '当前无任务'
    assert release_for(app, PHONE_A)['data']['content'].startswith('秋天的第一杯奶茶')


# --------------------------------------------------------------------------
# numbers, codes, profiles
# --------------------------------------------------------------------------

@pytest.mark.parametrize('which,expected', [
    ((), ['13900000001', '13900000002']), (('--free',), ['13900000002']), (('--bound',), ['13900000001'])])
def test_numbers_list_shows_bindings_and_filters_free_or_bound(world, run, which, expected):
    rows = json_of(run('numbers', 'list', *which, '--json'))
    assert [row['number'] for row in rows] == expected
    for row in rows:
        assert row['phone'] == ('A-01' if row['number'] == '13900000001' else None)
        assert (row['bound_at'] is None) == (row['phone'] is None)


def test_codes_list_masks_numbers_and_codes_unless_reveal(world, run, app):
    app.ok('/sms/receive', {'phone_number': '13900000001', 'content': '【小红书】验证码 381904，5分钟内有效'})
    masked = json_of(run('codes', 'list', '--json'))
    assert [(row['number'], row['code'], row['source'], row['sms']) for row in masked] == [
        ('139****0001', '3****4', 'sms', '【小红书】验证码 3****4，5分钟内有效'),
        ('139****0002', '6****3', 'operator', '')]
    table = run('codes', 'list').stdout
    for secret in ('381904', '604213', '13900000001', '13900000002'):
        assert secret not in table
    assert '139****0001' in table and '3****4' in table
    shown = json_of(run('codes', 'list', '--reveal', '--json'))
    assert [(row['number'], row['code'], row['sms']) for row in shown] == [
        ('13900000001', '381904', '【小红书】验证码 381904，5分钟内有效'), ('13900000002', '604213', '')]
    revealed = run('codes', 'list', '--reveal').stdout
    assert '381904' in revealed and '13900000002' in revealed


def test_codes_list_number_filter(world, run):
    rows = json_of(run('codes', 'list', '--number', '139 0000 0002', '--reveal', '--json'))
    assert [row['code'] for row in rows] == ['604213']
    assert json_of(run('codes', 'list', '--number', '13900000001', '--json')) == []


def test_codes_add_is_handed_to_the_phone_and_kept_out_of_the_audit(ok_run, run, app):
    assert one_line(ok_run('codes', 'add', '13900000007', '604213')) == 'code added for 139****0007'
    got = app.ok('/xhs_phone_management/get_verification_code', {'phone_number': '13900000007'})
    assert got['data']['verification_code'] == '604213'
    audit = run('audit', '--json').stdout + run('audit').stdout
    assert '604213' not in audit and 'code added for 139****0007' in audit


def test_profiles_list_shows_states_and_available_only(ok_run, run, app):
    ok_run('profiles', 'import', os.path.join(SAMPLES, 'profiles.csv'))
    add_phones(ok_run, ('A-01', PHONE_A))
    got = phone_call(app, '/xhs_phone_management/get_xhs_unregistered_information', PHONE_A,
                     get_info_number=1)
    assert got['data']['ret_data'][0]['name'] == '小美的日常'
    rows = json_of(run('profiles', 'list', '--json'))
    assert [(row['name'], row['state'], row['phone']) for row in rows] == [
        ('小美的日常', 'reserved', 'A-01'), ('阿杰爱做饭', 'available', None)]
    assert [row['name'] for row in json_of(run('profiles', 'list', '--available', '--json'))] == ['阿杰爱做饭']
    header, *body = run('profiles', 'list').stdout.splitlines()
    assert header.split() == ['ID', 'NAME', 'GENDER', 'BIRTHDAY', 'STATE', 'PHONE'] and len(body) == 2


# --------------------------------------------------------------------------
# tasks
# --------------------------------------------------------------------------

def test_add_release_prints_the_id_the_phone_receives(ok_run, run, app):
    add_phones(ok_run, ('A-01', PHONE_A))
    task = add_release(ok_run, '秋天的第一杯奶茶', '--title', '奶茶', '--topic', '秋天', '--topic', '奶茶',
                       '--platform', '2')
    row, = json_of(run('tasks', 'list', '--json'))
    assert (row['id'], row['status'], row['title'], row['content']) == (task, 'pending', '奶茶', '秋天的第一杯奶茶')
    got = release_for(app, PHONE_A)['data']
    assert got == {'id': task, 'content': '秋天的第一杯奶茶', 'title': '奶茶', 'platform': 2,
                   'topics': ['秋天', '奶茶']}


def test_add_release_copies_a_local_image_into_media_and_the_phone_gets_its_url(ok_run, app, tmp_path):
    add_phones(ok_run, ('A-01', PHONE_A))
    picture = tmp_path / 'cup.jpg'
    shutil.copy(NOTE_JPG, picture)
    add_release(ok_run, 'with picture', '--image', str(picture), '--image', 'https://img.example/x.png')
    picture.unlink()   # the queued task no longer needs the operator's file
    stored_files = os.listdir(models.media_dir())
    assert len(stored_files) == 1 and stored_files[0].endswith('.jpg')
    with open(os.path.join(models.media_dir(), stored_files[0]), 'rb') as handle, open(NOTE_JPG, 'rb') as original:
        assert handle.read() == original.read()
    got = app.ok('/xiaohongshu_biji/get_release_task', PHONE_A, headers={'Host': '192.168.1.10:8000'})
    images = got['data']['images']
    assert images == ['%s/media/%s' % (HOST_URL, stored_files[0]), 'https://img.example/x.png']
    download = app.get(images[0][len(HOST_URL):])
    assert download.status_int == 200 and download.body == open(NOTE_JPG, 'rb').read()


def test_add_release_with_an_image_url_keeps_the_url(ok_run, app):
    add_release(ok_run, 'remote picture', '--image', 'https://cdn.example/a/b.jpg?x=1')
    assert os.listdir(models.media_dir()) == []
    assert release_for(app, PHONE_A)['data']['images'] == ['https://cdn.example/a/b.jpg?x=1']


@pytest.mark.parametrize('at,handed_out', [('+2h', False), ('2020-01-01 08:00', True), ('10m', True)])
def test_add_release_at_a_time_is_not_handed_out_before_it(ok_run, run, app, at, handed_out):
    task = add_release(ok_run, 'scheduled', '--at', at)
    row, = json_of(run('tasks', 'list', '--json'))
    if at == '+2h':
        assert abs(epoch_of(row['run_at']) - (time.time() + 7200)) < 60
    got = release_for(app, PHONE_A)
    assert (got['data'].get('id') == task) is handed_out, got
    if not handed_out:
        assert got['msg'] == '当前无任务'


def test_add_release_priority_goes_first(ok_run, app):
    low = add_release(ok_run, 'low')
    high = add_release(ok_run, 'high', '--priority', '5')
    negative = add_release(ok_run, 'negative', '--priority', '-1')
    assert [release_for(app, phone)['data']['id'] for phone in (PHONE_A, PHONE_B, PHONE_C)] == [high, low, negative]


def test_add_reply_prints_the_id_the_phone_receives(ok_run, app):
    add_phones(ok_run, ('A-01', PHONE_A), ('B-02', PHONE_B))
    reply = task_id_of(ok_run('tasks', 'add-reply', '--phone', 'A-01', '--name', '路人甲',
                              '--msg', '您好，已收到～', '--platform', '2'), 'reply')
    assert phone_call(app, '/xiaohongshu_direct_essages/get_reply', PHONE_B)['msg'] == '当前无任务'
    got = phone_call(app, '/xiaohongshu_direct_essages/get_reply', PHONE_A)['data']
    assert got == {'id': reply, 'name': '路人甲', 'msg': '您好，已收到～', 'platform': 2}


def test_task_ids_are_unique_across_kinds(world, run):
    ids = [row['id'] for row in json_of(run('tasks', 'list', '--json'))]
    assert len(ids) == len(set(ids)) == 5


@pytest.mark.parametrize('filters,expected', [
    ((), ['done', 'claimed', 'reply', 'for_b', 'cancelled']),
    (('--status', 'pending'), ['reply', 'for_b']),
    (('--status', 'cancelled'), ['cancelled']),
    (('--kind', 'reply'), ['reply']),
    (('--kind', 'release', '--status', 'claimed'), ['claimed']),
    (('--phone', 'A-01'), ['done', 'claimed', 'reply']),
    (('--phone', 'B-02'), ['for_b']),
    (('--phone', 'A-01', '--kind', 'release', '--status', 'done'), ['done']),
], ids=lambda v: ' '.join(v) if isinstance(v, tuple) else None)
def test_tasks_list_filters_by_status_kind_and_phone(world, run, filters, expected):
    rows = json_of(run('tasks', 'list', *filters, '--json'))
    assert [row['id'] for row in rows] == [getattr(world, name) for name in expected]


def test_tasks_list_shows_state_phone_claim_time_and_result_url(world, run):
    rows = {row['id']: row for row in json_of(run('tasks', 'list', '--json'))}
    done = rows[world.done]
    assert (done['status'], done['phone'], done['result_url']) == ('done', 'A-01', NOTE_URL)
    assert abs(epoch_of(done['claimed_at']) - time.time()) < 60
    assert rows[world.for_b]['target'] == 'B-02' and rows[world.for_b]['claimed_at'] is None
    table = run('tasks', 'list').stdout
    assert NOTE_URL in table


def test_requeue_of_a_claimed_task_lets_another_phone_take_it(ok_run, run, app):
    task = add_release(ok_run, 'stuck on A')
    assert release_for(app, PHONE_A)['data']['id'] == task
    assert release_for(app, PHONE_B)['msg'] == '当前无任务'
    assert one_line(ok_run('tasks', 'requeue', task)) == 'release task %d requeued (was claimed)' % task
    row, = json_of(run('tasks', 'list', '--json'))
    assert (row['status'], row['phone'], row['claimed_at']) == ('pending', None, None)
    assert release_for(app, PHONE_B)['data']['id'] == task
    row, = json_of(run('tasks', 'list', '--json'))
    assert (row['status'], row['phone']) == ('claimed', PHONE_B['imsi'])


@pytest.mark.parametrize('claimed_first', [False, True], ids=['pending', 'claimed'])
def test_cancel_takes_a_task_out_of_hand_out(ok_run, run, app, claimed_first):
    task = add_release(ok_run, 'not wanted')
    if claimed_first:
        assert release_for(app, PHONE_A)['data']['id'] == task
    assert one_line(ok_run('tasks', 'cancel', task)) == 'release task %d cancelled (was %s)' % (
        task, 'claimed' if claimed_first else 'pending')
    assert release_for(app, PHONE_A)['msg'] == '当前无任务'
    assert release_for(app, PHONE_B)['msg'] == '当前无任务'
    assert [row['id'] for row in json_of(run('tasks', 'list', '--status', 'cancelled', '--json'))] == [task]


def test_requeue_of_a_cancelled_task_queues_it_again(ok_run, app):
    task = add_release(ok_run, 'changed my mind')
    ok_run('tasks', 'cancel', task)
    assert one_line(ok_run('tasks', 'requeue', task)) == 'release task %d requeued (was cancelled)' % task
    assert release_for(app, PHONE_A)['data']['id'] == task


# --------------------------------------------------------------------------
# logs
# --------------------------------------------------------------------------

@pytest.fixture
def log_lines(ok_run, app, monkeypatch):
    """A-01 wrote 'boot old' 10 days ago; now A-01 'task ok', B-02 'upload 失败', A-01 'task done'."""
    add_phones(ok_run, ('A-01', PHONE_A), ('B-02', PHONE_B))
    ten_days_ago = time.time() - 10 * 86400
    with monkeypatch.context() as patch:
        patch.setattr(models, 'now', lambda: ten_days_ago)
        phone_log(app, PHONE_A, 'boot old')
    for phone, msg in ((PHONE_A, 'task ok'), (PHONE_B, 'upload 失败'), (PHONE_A, 'task done')):
        phone_log(app, phone, msg)
    return ten_days_ago


FIVE_DAYS_AGO = time.strftime('%Y-%m-%d %H:%M', time.localtime(time.time() - 5 * 86400))


@pytest.mark.parametrize('filters,expected', [
    ((), ['boot old', 'task ok', 'upload 失败', 'task done']),
    (('--phone', 'A-01'), ['boot old', 'task ok', 'task done']),
    (('--phone', PHONE_B['iccid']), ['upload 失败']),
    (('--since', '2d'), ['task ok', 'upload 失败', 'task done']),
    (('--since', FIVE_DAYS_AGO), ['task ok', 'upload 失败', 'task done']),
    (('--grep', 'task'), ['task ok', 'task done']),
    (('--grep', '失败'), ['upload 失败']),
    (('--limit', '2'), ['upload 失败', 'task done']),
    (('--phone', 'A-01', '--since', '1h', '--limit', '1'), ['task done']),
], ids=lambda v: ' '.join(v) if isinstance(v, tuple) else None)
def test_logs_filter_by_phone_since_grep_and_limit_newest_last(log_lines, run, filters, expected):
    rows = json_of(run('logs', *filters, '--json'))
    assert [row['msg'] for row in rows] == expected
    table = run('logs', *filters).stdout.splitlines()
    assert [line.split(None, 3)[3] for line in table] == expected


def test_logs_json_has_phone_and_local_iso_time(log_lines, run):
    rows = json_of(run('logs', '--json'))
    assert [row['phone'] for row in rows] == ['A-01', 'A-01', 'B-02', 'A-01']
    assert abs(epoch_of(rows[0]['at']) - log_lines) < 2
    assert local(epoch_of(rows[0]['at'])) == local(log_lines)


def test_logs_prune_deletes_only_older_lines_and_says_how_many(log_lines, run, ok_run):
    line = one_line(ok_run('logs', 'prune', '--before', '5d'))
    assert re.fullmatch(r'deleted 1 log lines before (\S+ \S+)', line), line
    assert abs(time.mktime(time.strptime(line[-19:], '%Y-%m-%d %H:%M:%S')) - (time.time() - 5 * 86400)) < 60
    assert [row['msg'] for row in json_of(run('logs', '--json'))] == ['task ok', 'upload 失败', 'task done']
    assert one_line(ok_run('logs', 'prune', '--before', '5d')).startswith('deleted 0 log lines')
    assert len(json_of(run('logs', '--json'))) == 3


# --------------------------------------------------------------------------
# settings
# --------------------------------------------------------------------------

def test_settings_shows_every_tunable_with_value_default_and_meaning(run):
    result = run('settings')
    assert result.exit_code == 0
    header, *body = result.stdout.splitlines()
    assert header.split() == ['KEY', 'VALUE', 'DEFAULT', 'MEANING']
    assert [line.split()[0] for line in body] == list(models.SETTINGS)
    for line, (key, (default, meaning)) in zip(body, models.SETTINGS.items()):
        assert line.endswith(meaning), line
    rows = json_of(run('settings', '--json'))
    assert rows == [{'key': key, 'value': default, 'default': default, 'meaning': meaning}
                    for key, (default, meaning) in models.SETTINGS.items()]


@pytest.mark.parametrize('key', ['rest_day', 'rest_night', 'activity_window', 'code_lifetime',
                                 'reservation_window', 'max_body_mb', 'max_image_mb', 'day_start'])
def test_settings_key_shows_its_value(run, key):
    assert run('settings', key).stdout == '%s\n' % models.SETTINGS[key][0]


def test_settings_key_value_sets_it_and_phones_are_told(ok_run, run, app):
    assert one_line(ok_run('settings', 'rest_day', '33')) == 'rest_day: 20 -> 33'
    assert one_line(ok_run('settings', 'rest_night', '33')) == 'rest_night: 120 -> 33'
    assert run('settings', 'rest_night').stdout == '33\n'
    row, = json_of(run('settings', 'rest_night', '--json'))
    assert row == {'key': 'rest_night', 'value': 33, 'default': 120, 'meaning': models.SETTINGS['rest_night'][1]}
    told = phone_call(app, '/xiaohongshu_direct_essages/get_screenshot_time', PHONE_A)
    assert told['data'] == {'screenshot_time': 33}


# --------------------------------------------------------------------------
# audit
# --------------------------------------------------------------------------

def test_audit_records_each_command_that_changed_data(ok_run, run, app):
    said = [one_line(ok_run('phones', 'add', '--imsi', PHONE_A['imsi'], '--iccid', PHONE_A['iccid'],
                            '--label', 'A-01')),
            one_line(ok_run('settings', 'rest_night', '150')),
            one_line(ok_run('tasks', 'add-release', '--content', 'audited', '--phone', 'A-01'))]
    for args in (('phones', 'list'), ('status',), ('tasks', 'list'), ('settings',), ('settings', 'rest_night'),
                 ('logs',), ('codes', 'list'), ('numbers', 'list'), ('audit',)):
        assert run(*args).exit_code == 0
    assert run('phones', 'set', 'A-01').exit_code != 0
    assert run('tasks', 'cancel', '999').exit_code != 0
    rows = json_of(run('audit', '--json'))
    assert [row['change'] for row in rows] == said
    assert [row['command'].split(' {')[0].split(' ', 1)[1] for row in rows] == [
        'phones add', 'settings', 'tasks add-release']
    assert '"label": "A-01"' in rows[0]['command'] and '"value": "150"' in rows[1]['command']
    assert all(row['user'] for row in rows)
    assert all(abs(epoch_of(row['at']) - time.time()) < 60 for row in rows)
    header, *body = run('audit').stdout.splitlines()
    assert header.split()[:3] == ['TIME', 'USER', 'CHANGE'] and len(body) == 3
    assert [said_line in line for said_line, line in zip(said, body)] == [True, True, True]


def test_audit_since_and_limit(ok_run, run):
    ok_run('settings', 'rest_day', '21')
    ok_run('settings', 'rest_day', '22')
    assert [row['change'] for row in json_of(run('audit', '--limit', '1', '--json'))] == ['rest_day: 21 -> 22']
    assert len(json_of(run('audit', '--since', '1h', '--json'))) == 2
    assert json_of(run('audit', '--since', '+1h', '--json')) == []


# --------------------------------------------------------------------------
# backup
# --------------------------------------------------------------------------

def backup_rows(path):
    con = sqlite3.connect(path)
    try:
        assert con.execute('PRAGMA integrity_check').fetchone()[0] == 'ok'
        return {table: con.execute('SELECT COUNT(*) FROM %s' % table).fetchone()[0]
                for table in ('phone', 'number', 'profile', 'task', 'code', 'log')}
    finally:
        con.close()


def test_backup_writes_a_consistent_copy_that_opens_with_sqlite(world, run, tmp_path, app):
    dest = tmp_path / 'backups' / 'copy.db'
    dest.parent.mkdir()
    result = run('backup', str(dest))
    line = one_line(result)
    assert line.startswith('backed up ') and str(dest) in line
    assert backup_rows(str(dest)) == {'phone': 2, 'number': 2, 'profile': 2, 'task': 5, 'code': 1, 'log': 1}
    assert os.listdir(dest.parent) == ['copy.db']
    phone_log(app, PHONE_B, 'after the backup')   # the live database goes on; the copy does not change
    assert backup_rows(str(dest))['log'] == 1


def test_backup_refuses_to_overwrite_without_force(world, run, tmp_path):
    dest = tmp_path / 'copy.db'
    dest.write_bytes(b'yesterday')
    assert_one_line_error(run('backup', str(dest)), '--force')
    assert dest.read_bytes() == b'yesterday'
    one_line(run('backup', str(dest), '--force'))
    assert backup_rows(str(dest))['task'] == 5


def test_backup_refuses_the_live_database(world, run, db_path):
    before = os.path.getsize(db_path)
    assert_one_line_error(run('backup', db_path), 'live database')
    assert os.path.getsize(db_path) == before
    assert backup_rows(db_path)['task'] == 5


def test_backup_into_a_missing_folder_is_a_one_line_error(world, run, tmp_path):
    dest = tmp_path / 'no-such-folder' / 'copy.db'
    assert_one_line_error(run('backup', str(dest)), 'no-such-folder')
    assert not (tmp_path / 'no-such-folder').exists()


def test_a_failed_backup_leaves_no_partial_file(world, run, tmp_path):
    dest = tmp_path / 'a-folder'
    dest.mkdir()
    result = run('backup', str(dest), '--force')
    assert result.exit_code != 0 and isinstance(result.exception, SystemExit)
    assert 'Traceback' not in result.output and result.stdout == ''
    assert lines_of(result.stderr)[-1].startswith('Error: ')
    assert [name for name in os.listdir(tmp_path) if name.endswith('.partial')] == []
    assert dest.is_dir() and list(dest.iterdir()) == []


def test_a_database_of_the_first_schema_is_brought_up_to_date_keeping_its_rows(tmp_path, ok_run):
    path = str(tmp_path / 'old.db')
    ok_run('--db', path, 'phones', 'add', '--imsi', '460011234567809', '--iccid', '89860112345678901209',
           '--mac', '5c:cf:7f:00:00:09', '--type', '1', '--label', 'OLD-1')
    with sqlite3.connect(path) as conn:   # as a server of the first schema left it
        conn.execute('DROP INDEX phone_mac')
        conn.execute('PRAGMA user_version = 1')
    listed = subprocess.run(xhs_command() + ['--db', path, 'phones', 'list', '--json'],
                            capture_output=True, text=True, check=True)   # a new process opens it
    assert [phone['label'] for phone in json.loads(listed.stdout)] == ['OLD-1']
    with sqlite3.connect(path) as conn:
        assert conn.execute('PRAGMA user_version').fetchone()[0] == 2
        assert conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'phone_mac'").fetchone()


def test_processes_opening_an_old_database_at_once_each_take_a_step_once(tmp_path, ok_run):
    path = str(tmp_path / 'old.db')
    ok_run('--db', path, 'phones', 'add', '--imsi', '460011234567809', '--iccid', '89860112345678901209')
    with sqlite3.connect(path) as conn:
        conn.execute('DROP INDEX phone_mac')
        conn.execute('PRAGMA user_version = 1')
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute('BEGIN IMMEDIATE')   # every opener now reads version 1 and waits for the lock
    openers = [subprocess.Popen(xhs_command() + ['--db', path, 'phones', 'list', '--json'],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(4)]
    time.sleep(1.5)
    holder.execute('COMMIT')
    holder.close()
    results = [opener.communicate(timeout=60) + (opener.returncode,) for opener in openers]
    assert [code for _, _, code in results] == [0] * 4, [err for _, err, _ in results]
    with sqlite3.connect(path) as conn:
        assert conn.execute('PRAGMA user_version').fetchone()[0] == 2
