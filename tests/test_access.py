"""Who may call: token mode, the LAN allowlist, approval mode, /media confinement, quiet logs."""
import json
import time
import urllib.parse

import pytest

import models
from conftest import b64

SIM = {'imsi': '460011234567801', 'iccid': '89860112345678901201'}
TOKEN = 's3cret-t0ken-0123456789'


def envelope(server, method, target, body=b'', headers=None):
    status, ctype, data = server.request(method, target, body, headers)
    assert status == 200 and ctype == 'application/json; charset=utf-8', (status, ctype, data[:100])
    return json.loads(data)


FORM = {'Content-Type': 'application/x-www-form-urlencoded'}


@pytest.mark.parametrize('how', ['parameter', 'x-token', 'bearer', 'json'])
def test_token_mode_accepts_the_token_every_way(live, how):
    server = live(['--token', TOKEN])
    params = dict(SIM, log_msg='有令牌')
    headers = dict(FORM)
    if how == 'parameter':
        params['token'] = TOKEN
    elif how == 'x-token':
        headers['X-Token'] = TOKEN
    elif how == 'bearer':
        headers['Authorization'] = 'Bearer ' + TOKEN
    body = urllib.parse.urlencode(params).encode()
    if how == 'json':
        body = json.dumps(dict(params, token=TOKEN)).encode()
        headers = {'Content-Type': 'application/json'}
    assert envelope(server, 'POST', '/xhs_phone_log/add', body, headers)['code'] == 200


@pytest.mark.parametrize('headers', [{}, {'X-Token': 'wrong'}, {'Authorization': 'Bearer ' + TOKEN[:-1]},
                                     {'Authorization': 'Basic ' + TOKEN}])
def test_token_mode_refuses_missing_or_wrong_token_and_stores_nothing(live, headers):
    server = live(['--token', TOKEN])
    body = urllib.parse.urlencode(dict(SIM, log_msg='无令牌')).encode()
    answer = envelope(server, 'POST', '/xhs_phone_log/add', body, dict(FORM, **headers))
    assert answer == {'code': 401, 'msg': '未授权', 'data': {}, 'note': {}}
    sms = urllib.parse.urlencode({'phone_number': '13900000001', 'content': '验证码 123456'}).encode()
    assert envelope(server, 'POST', '/sms/receive', sms, dict(FORM, **headers))['code'] == 401
    assert json.loads(server.cli('logs', '--json').stdout) == []
    assert json.loads(server.cli('codes', 'list', '--json').stdout) == []


def test_token_mode_guards_media_but_not_healthz(live):
    server = live(['--token', TOKEN])
    body = urllib.parse.urlencode(dict(SIM, name='甲', img_base64_data=b64('dm.png'), token=TOKEN)).encode()
    key = envelope(server, 'POST', '/xiaohongshu_direct_essages/save_screenshots', body, FORM)['data']['key']
    path = urllib.parse.urlparse(key).path
    assert envelope(server, 'GET', path)['code'] == 401
    status, ctype, data = server.request('GET', path, headers={'X-Token': TOKEN})
    assert status == 200 and ctype == 'image/png' and data[:4] == b'\x89PNG'
    assert server.request('GET', path + '?token=' + TOKEN)[0] == 200
    assert envelope(server, 'GET', '/healthz')['code'] == 200


def test_allowlist_that_excludes_the_caller_refuses_everything(live):
    server = live(['--allow', '10.20.0.0/16'])
    body = urllib.parse.urlencode(dict(SIM, log_msg='外人')).encode()
    for method, target in [('POST', '/xhs_phone_log/add'), ('GET', '/healthz'),
                           ('GET', '/media/0123456789abcdef0123456789abcdef.png'),
                           ('POST', '/sms/receive'), ('GET', '/no/such/path')]:
        assert envelope(server, method, target, body, FORM) == {
            'code': 403, 'msg': '禁止访问', 'data': {}, 'note': {}}, target
    assert json.loads(server.cli('logs', '--json').stdout) == []


def test_allowlist_including_loopback_lets_the_caller_in(live):
    server = live(['--allow', '10.20.0.0/16', '--allow', '127.0.0.1/32'])
    body = urllib.parse.urlencode(dict(SIM, log_msg='自己人')).encode()
    assert envelope(server, 'POST', '/xhs_phone_log/add', body, FORM)['code'] == 200


def test_approval_mode_keeps_new_phones_out_until_approved(live):
    server = live(['--approve-new'])
    body = urllib.parse.urlencode(dict(SIM, log_msg='新手机')).encode()
    assert envelope(server, 'POST', '/xhs_phone_log/add', body, FORM)['code'] == 403
    poll = '/xiaohongshu_biji/get_release_task?' + urllib.parse.urlencode(SIM)
    assert envelope(server, 'GET', poll)['code'] == 403
    assert [row['msg'] for row in json.loads(server.cli('logs', '--json').stdout)] == ['新手机']
    phones = json.loads(server.cli('phones', 'list', '--json').stdout)
    assert [(p['imsi'], p['approved']) for p in phones] == [(SIM['imsi'], False)]
    server.cli('phones', 'set', SIM['imsi'], '--approve')
    # The server finds phones in a copy of the phone table, read again every COPY_TTL.
    deadline = time.monotonic() + models.COPY_TTL + 2
    while envelope(server, 'GET', poll)['code'] == 403 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert envelope(server, 'GET', poll) == {'code': 200, 'msg': '当前无任务', 'data': {}, 'note': {}}


def test_phones_added_by_the_operator_are_approved_in_approval_mode(live):
    server = live(['--approve-new'])
    server.cli('phones', 'add', '--imsi', SIM['imsi'], '--iccid', SIM['iccid'], '--label', 'A-01')
    poll = '/xiaohongshu_biji/get_release_task?' + urllib.parse.urlencode(SIM)
    assert envelope(server, 'GET', poll)['code'] == 200


TRAVERSALS = [
    '/media/../live.db', '/media/..%2flive.db', '/media/..%2Flive.db', '/media/%2e%2e/live.db',
    '/media/%2e%2e%2flive.db', '/media/..%5clive.db', '/media/..\\live.db', '/media//etc/passwd',
    '/media/%2fetc%2fpasswd', '/media/%252e%252e%252flive.db', '/media/....//live.db',
    '/media/%c0%ae%c0%ae/live.db', '/media/.%00./live.db', '/media/live.db', '/media/media/../../live.db',
    '/api_hurong/media/../live.db', '/media/0123456789abcdef0123456789abcdef.png/../../live.db',
]


def test_media_refuses_every_name_that_leaves_the_media_folder(live):
    server = live()
    with open(server.db, 'rb') as handle:
        secret = handle.read(16)
    for target in TRAVERSALS:
        status, ctype, data = server.request('GET', target)
        assert status in (200, 404) and ctype.startswith('application/json'), (target, status, ctype)
        assert json.loads(data)['code'] in (402, 404), target
        assert secret not in data


def test_server_log_lines_carry_no_token_code_or_phone_number(live):
    server = live(['--token', TOKEN, '--access-log'])
    number = '13912345678'
    sms = {'from': '1069000000000', 'content': '【小红书】验证码 918273，5分钟内有效',
           'phone_number': number, 'token': TOKEN}
    assert envelope(server, 'POST', '/sms/receive', urllib.parse.urlencode(sms).encode(), FORM)['code'] == 200
    query = urllib.parse.urlencode({'phone_number': number, 'token': TOKEN})
    code = envelope(server, 'GET', '/xhs_phone_management/get_verification_code?' + query)
    assert code['data']['verification_code'] == '918273'
    envelope(server, 'GET', '/no/such/thing?token=' + TOKEN + '&phone_number=' + number)
    server.stop()
    logged = server.stderr_text()
    assert 'GET /xhs_phone_management/get_verification_code' in logged
    for secret in (TOKEN, number, '918273'):
        assert secret not in logged
