"""Replay the recorded morning of phone traffic, byte for byte, against a real server."""
import json
import os
import urllib.parse

from conftest import SAMPLES


def load_session():
    with open(os.path.join(SAMPLES, 'session.jsonl'), encoding='utf-8') as handle:
        return [json.loads(line) for line in handle if line.strip()]


def dig(body, path):
    value = body
    for part in path.split('.'):
        value = value[int(part)] if isinstance(value, list) else value[part]
    return value


def substitute(text, captured, encode):
    for name, value in captured.items():
        text = text.replace('{{%s}}' % name, urllib.parse.quote(str(value), safe='') if encode else str(value))
    return text


def step_body(step, captured):
    if 'body_file' in step:
        with open(os.path.join(SAMPLES, step['body_file']), 'rb') as handle:
            return handle.read()
    body = step.get('body')
    if body is None:
        return b''
    urlencoded = 'urlencoded' in step['headers'].get('Content-Type', '')
    return substitute(body, captured, urlencoded).encode('utf-8')


def expected(value, captured):
    if isinstance(value, str) and value.startswith('{{') and value.endswith('}}'):
        return captured[value[2:-2]]
    return value


def operator_setup(server):
    server.cli('phones', 'add', '--imsi', '460011234567801', '--iccid', '89860112345678901201',
               '--label', 'A-01')
    server.cli('numbers', 'import', os.path.join(SAMPLES, 'numbers.txt'))
    server.cli('profiles', 'import', os.path.join(SAMPLES, 'profiles.csv'))
    server.cli('tasks', 'import', os.path.join(SAMPLES, 'release.jsonl'))
    server.cli('tasks', 'add-reply', '--phone', '460011234567801', '--name', '路人甲',
               '--msg', '您好，已收到～ 稍后发您链接')


def test_recorded_session_replays_step_by_step(live):
    server = live()
    operator_setup(server)
    steps = load_session()
    assert [step['step'] for step in steps] == list(range(1, 29))
    captured = {}
    for step in steps:
        body = step_body(step, captured)
        headers = dict(step['headers'])
        if body:
            headers['Content-Length'] = str(len(body))
        target = substitute(step['target'], captured, True)
        status, ctype, raw = server.request(step['method'], target, body, headers)
        assert status == 200, (step['step'], status)
        assert ctype == 'application/json; charset=utf-8', (step['step'], ctype)
        answer = json.loads(raw.decode('utf-8'))
        for path, value in step['expect'].items():
            assert dig(answer, path) == expected(value, captured), (step['step'], step['note'], answer)
        for name, path in step.get('capture', {}).items():
            captured[name] = dig(answer, path)

    # What the morning left in the database, seen through the operator's CLI.
    tasks = json.loads(server.cli('tasks', 'list', '--json').stdout)
    release = next(t for t in tasks if t['kind'] == 'release')
    assert release['status'] == 'done' and release['id'] == captured['release_id']
    assert release['result_url'].startswith('https://www.xiaohongshu.com/explore/6751c0de000000000b00aa01')
    reply = next(t for t in tasks if t['kind'] == 'reply')
    assert reply['status'] == 'done'
    phones = {p['imsi'] or p['mac']: p for p in json.loads(server.cli('phones', 'list', '--json').stdout)}
    assert phones['460011234567801']['account'] == captured['profile_name']
    assert phones['460011234567801']['mac'] == 'aa:bb:cc:00:11:01'
    assert phones['460011234567801']['number'] == captured['phone_number']
    assert phones['5c:cf:7f:00:00:01']['type'] == 1
    comments = json.loads(server.cli('comments', 'list', '--json').stdout)
    assert len(comments) == 1 and comments[0]['note_id'] == captured['release_id']
    profiles = json.loads(server.cli('profiles', 'list', '--json').stdout)
    assert [p['state'] for p in profiles if p['name'] == captured['profile_name']] == ['used']
    logs = json.loads(server.cli('logs', '--json').stdout)
    assert [row['msg'] for row in logs][:1] == ['脚本启动 v2.3.1，开始检查账号']
    assert '已查询完评论信息 🙂' in [row['msg'] for row in logs]
