"""The phone API over HTTP (webtest): every endpoint of API.md §1-§5 except comment moderation.

The operator's side is set up and inspected through the CLI (`ok_run`), or by
reading the models where the CLI shows nothing (stored screenshots, raw log
metadata). Times are moved by monkeypatching `models.now`.
"""
import base64
import datetime
import errno
import fcntl
import hashlib
import json
import os
import re
import resource
import struct
import time
import urllib.parse
import zlib

import pytest

import models
import xhs_server
from conftest import PHONE_A, PHONE_B, b64, png_like, sample

PHONE_C = {'imsi': '460011234567803', 'iccid': '89860112345678901203'}
HOST = '192.168.1.10:8000'
JSON_CT = 'application/json; charset=utf-8'

LOG = '/xhs_phone_log/add'
USERINFO = '/xiaohongshu_userprofile/update_userinfo'
READING = '/xiaohongshu_userprofile/update_reading_update_time'
IS_UPDATE = '/xiaohongshu_userprofile/is_update_userinfo'
UPDATED_TODAY = '/xiaohongshu_userprofile/check_updated_today'
RELEASE = '/xiaohongshu_biji/get_release_task'
UPLOAD = '/xiaohongshu_biji/upload_url'
DM_SHOT = '/xiaohongshu_direct_essages/save_screenshots'
GET_REPLY = '/xiaohongshu_direct_essages/get_reply'
REPLY_SAVE = '/xiaohongshu_direct_essages/reply_save'
SHOT_TIME = '/xiaohongshu_direct_essages/get_screenshot_time'
WORK_STATUS = '/xhs_phone_management/get_phone_work_status'
NUMBER = '/xhs_phone_management/get_phone_number'
CODE = '/xhs_phone_management/get_verification_code'
PROFILES = '/xhs_phone_management/get_xhs_unregistered_information'
ARTICLE_SHOT = '/DMS_screenshots/save_screenshots'
SMS = '/sms/receive'

NOTE_URL = 'https://www.xiaohongshu.com/explore/6751c0de000000000b00aa01?xsec_token=AB12&xsec_source=pc_share'
OTHER_NOTE_URL = 'https://www.xiaohongshu.com/explore/6751c0de000000000b00bb02?xsec_token=CD34'
EMOJI_TEXT = '脚本启动🙂，开始'
MEDIA_URL_RE = re.compile(r'^http://192\.168\.1\.10:8000/media/([^/?#]+)$')

ACCOUNT = dict(PHONE_A, phone_num='13900000001', name='小美的日常', xiaohongshu_id='95012345678',
               home_url='https://www.xiaohongshu.com/user/profile/5f1e0000000000000100a1b2',
               macaddr='AA:BB:CC:00:11:01', platform='1')


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------

@pytest.fixture(autouse=True)
def open_access():
    """Access rules back to the defaults after each test, whatever it configured."""
    yield
    xhs_server.configure()


def strict_envelope(res):
    """HTTP 200, the exact JSON content type, the four envelope keys."""
    assert res.status_int == 200, res.status
    assert res.headers['Content-Type'] == JSON_CT
    body = json.loads(res.body.decode('utf-8'))
    assert set(body) == {'code', 'msg', 'data', 'note'}, body
    return body


def raw(app, path, body=b'', content_type=None, method='POST', headers=None, environ=None):
    """A request exactly as given (no Content-Type unless one is passed)."""
    all_headers = {'Host': HOST}
    all_headers.update(headers or {})
    kwargs = {'method': method, 'headers': all_headers}
    if body:
        kwargs['body'] = body
    if content_type is not None:
        kwargs['content_type'] = content_type
    if environ:
        kwargs['environ'] = environ
    return app.request(path, **kwargs)


def as_json(params):
    return json.dumps(params, ensure_ascii=False).encode('utf-8')


ENCODINGS = ['query', 'query_post', 'form', 'json', 'text', 'json_no_content_type',
             'json_in_json_string', 'multipart']


def send(app, path, params, encoding):
    """Send params in one of the ways phones do; returns the (strictly checked) envelope."""
    if encoding == 'query':
        res = raw(app, path + '?' + urllib.parse.urlencode(params), method='GET')
    elif encoding == 'query_post':
        res = raw(app, path + '?' + urllib.parse.urlencode(params))
    elif encoding == 'form':
        res = app.post(path, urllib.parse.urlencode(params),
                       content_type='application/x-www-form-urlencoded')
    elif encoding == 'json':
        res = app.post(path, as_json(params), content_type='application/json')
    elif encoding == 'text':
        res = app.post(path, as_json(params), content_type='text/plain')
    elif encoding == 'json_no_content_type':
        res = raw(app, path, as_json(params))
    elif encoding == 'json_in_json_string':
        res = app.post(path, json.dumps(json.dumps(params, ensure_ascii=False), ensure_ascii=False).encode(),
                       content_type='application/json')
    elif encoding == 'multipart':
        res = app.post(path, params={k: str(v) for k, v in params.items()},
                       content_type='multipart/form-data')
    else:
        raise ValueError(encoding)
    return strict_envelope(res)


def post_json(app, path, params):
    return strict_envelope(app.post(path, as_json(params), content_type='application/json'))


def cli_json(ok_run, *args):
    return json.loads(ok_run(*args, '--json').stdout)


def log_msgs(ok_run):
    return [row['msg'] for row in cli_json(ok_run, 'logs')]


def task_rows(ok_run):
    return {row['id']: row for row in cli_json(ok_run, 'tasks', 'list')}


def phone_rows(ok_run):
    return {row['imsi'] or row['mac']: row for row in cli_json(ok_run, 'phones', 'list')}


def add_release(ok_run, content, *options):
    ok_run('tasks', 'add-release', '--content', content, *options)
    return max(task_rows(ok_run))


def add_reply(ok_run, phone, name='路人甲', msg='您好，已收到～ 稍后发您链接🙂'):
    ok_run('tasks', 'add-reply', '--phone', phone, '--name', name, '--msg', msg)
    return max(task_rows(ok_run))


def register(ok_run, sim, label):
    ok_run('phones', 'add', '--imsi', sim['imsi'], '--iccid', sim['iccid'], '--label', label)


def media_files():
    return sorted(os.listdir(models.media_dir()))


def media_path(url):
    match = MEDIA_URL_RE.match(url)
    assert match, url
    return '/media/' + match.group(1)


def tiny_png(seed):
    """A valid 1x1 PNG whose colour (and so content) depends on seed."""
    def chunk(kind, data):
        return struct.pack('>I', len(data)) + kind + data + struct.pack('>I', zlib.crc32(kind + data))
    pixel = b'\x00' + bytes([seed % 256, seed // 256 % 256, 7])
    return (b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', struct.pack('>IIBBBBB', 1, 1, 8, 2, 0, 0, 0))
            + chunk(b'IDAT', zlib.compress(pixel)) + chunk(b'IEND', b''))


def big_png(size):
    """A valid PNG of about `size` bytes (one row of incompressible pixels)."""
    width = size // 3 + 1
    def chunk(kind, data):
        return struct.pack('>I', len(data)) + kind + data + struct.pack('>I', zlib.crc32(kind + data))
    row = b'\x00' + os.urandom(width * 3)
    return (b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', struct.pack('>IIBBBBB', width, 1, 8, 2, 0, 0, 0))
            + chunk(b'IDAT', zlib.compress(row, 0)) + chunk(b'IEND', b''))


def b64s(data):
    return base64.b64encode(data).decode('ascii')


@pytest.fixture
def clock(monkeypatch):
    """models.now under the test's control, starting at the real time."""
    class Clock:
        t = time.time()

        def set(self, value):
            Clock.t = value

        def advance(self, seconds):
            Clock.t += seconds
    monkeypatch.setattr(models, 'now', lambda: Clock.t)
    return Clock()


def today_at(hour, minute=0):
    return datetime.datetime.combine(datetime.date.today(), datetime.time(hour, minute)).timestamp()


# --------------------------------------------------------------------------
# §1 Conventions: paths, methods, the envelope
# --------------------------------------------------------------------------

PATH_VARIANTS = ['/{g}/{a}', '/{g}/{a}/0', '/{g}/{a}/0/', '/{g}/{a}/', '/api_hurong/{g}/{a}/0',
                 '/api_hurong/{g}/{a}', '/api_hurong/{g}/{a}/0/', '/{g}/{a}/17']


@pytest.mark.parametrize('method', ['GET', 'POST'])
@pytest.mark.parametrize('variant', PATH_VARIANTS)
def test_log_add_answers_under_every_path_variant_and_method(app, ok_run, variant, method):
    path = variant.format(g='xhs_phone_log', a='add')
    body = send(app, path, dict(PHONE_A, log_msg='路径 ' + variant),
                'query' if method == 'GET' else 'form')
    assert (body['code'], body['msg'], body['data'], body['note']) == (200, '日志纪录成功', {}, {})
    assert log_msgs(ok_run) == ['路径 ' + variant]


@pytest.mark.parametrize('method', ['GET', 'POST'])
@pytest.mark.parametrize('variant', PATH_VARIANTS)
def test_query_endpoint_answers_under_every_path_variant_and_method(app, variant, method):
    path = variant.format(g='xiaohongshu_userprofile', a='is_update_userinfo')
    body = send(app, path, PHONE_A, 'query' if method == 'GET' else 'json')
    assert (body['code'], body['msg'], body['data']) == (200, '查询成功', {'is_update': True})


@pytest.mark.parametrize('path', [
    '/xhs_phone_log/nope', '/xhs_phone_log/nope/0', '/nope/add', '/xhs_phone_log', '/xhs_phone_log/add/0/1',
    '/xhs_phone_log/add/abc', '/api_hurong/nope/x/0', '/api_hurong', '/', '/favicon.ico', '/media',
    '/xiaohongshu_direct_essages/save_screenshot', '/xiaohongshu_direct_messages/get_reply',
    '/XHS_PHONE_LOG/ADD', '/healthz/0',
])
def test_unknown_action_or_path_answers_402(app, ok_run, path):
    for method in ('GET', 'POST'):
        body = strict_envelope(raw(app, path + '?log_msg=x&imsi=%s&iccid=%s' % (PHONE_A['imsi'], PHONE_A['iccid']),
                                   method=method))
        assert (body['code'], body['msg']) == (402, '请求异常')
    body = strict_envelope(raw(app, path, as_json(dict(PHONE_A, log_msg='x')), 'application/json'))
    assert (body['code'], body['msg']) == (402, '请求异常')
    assert log_msgs(ok_run) == []


@pytest.mark.parametrize('method', ['PUT', 'DELETE', 'PATCH', 'OPTIONS'])
def test_other_http_methods_on_unknown_path_answer_402_envelope(app, method):
    body = strict_envelope(raw(app, '/no/such/thing', b'{}', 'application/json', method=method))
    assert (body['code'], body['msg']) == (402, '请求异常')


@pytest.mark.parametrize('method', ['PUT', 'DELETE', 'PATCH', 'OPTIONS'])
def test_other_http_methods_on_phone_endpoint_answer_json_envelope(app, method):
    body = strict_envelope(raw(app, IS_UPDATE, as_json(PHONE_A), 'application/json', method=method))
    assert body['code'] in (200, 402)


@pytest.mark.parametrize('method', ['POST', 'PUT'])
def test_other_methods_on_healthz_and_media_still_answer_envelope(app, method):
    for path in ('/healthz', '/media/0123456789abcdef0123456789abcdef.png'):
        body = strict_envelope(raw(app, path, method=method))
        assert body['code'] != 200


def test_answers_are_utf8_json_with_chinese_not_escaped(app):
    res = app.post(LOG, urllib.parse.urlencode({'log_msg': 'x'}),
                   content_type='application/x-www-form-urlencoded')
    assert res.headers['Content-Type'] == JSON_CT
    assert '日志纪录成功'.encode('utf-8') in res.body
    assert b'\\u' not in res.body


@pytest.mark.parametrize('case', ['success', 'missing', 'unknown_action', 'token', 'address', 'too_big'])
def test_every_deliberate_answer_is_http_200_json(app, ok_run, case):
    expected = {'success': 200, 'missing': 301, 'unknown_action': 402, 'token': 401,
                'address': 403, 'too_big': 413}[case]
    path, body, environ = LOG, urllib.parse.urlencode({'log_msg': 'x'}).encode(), None
    if case == 'missing':
        body = b'imsi=123456'
    elif case == 'unknown_action':
        path = '/xhs_phone_log/remove'
    elif case == 'token':
        xhs_server.configure(token='s3cret')
    elif case == 'address':
        environ = {'REMOTE_ADDR': '8.8.8.8'}
    elif case == 'too_big':
        ok_run('settings', 'max_body_mb', '1')
        body = b'log_msg=' + b'x' * (1024 * 1024 + 10)
    answer = strict_envelope(raw(app, path, body, 'application/x-www-form-urlencoded', environ=environ))
    assert answer['code'] == expected


# --------------------------------------------------------------------------
# §1 Parameters: the encodings matrix
# --------------------------------------------------------------------------

@pytest.mark.parametrize('encoding', ENCODINGS)
def test_log_text_round_trips_exactly_in_every_encoding(app, ok_run, encoding):
    params = dict(PHONE_A, log_msg=EMOJI_TEXT, macaddr='aa:bb:cc:00:11:01', ip_addr='192.168.1.101',
                  phone_type=2, t='phone', user_id='77', timestamp='1733212800123', rand_str='x9')
    body = send(app, LOG, params, encoding)
    assert (body['code'], body['msg']) == (200, '日志纪录成功')
    assert log_msgs(ok_run) == [EMOJI_TEXT]
    assert phone_rows(ok_run)[PHONE_A['imsi']]['mac'] == 'aa:bb:cc:00:11:01'


@pytest.mark.parametrize('encoding', ENCODINGS)
def test_account_fields_round_trip_exactly_in_every_encoding(app, ok_run, encoding):
    params = dict(ACCOUNT, name='小美🙂的日常 “引号” & =', platform=1, xhs_version='8.1.0')
    body = send(app, USERINFO, params, encoding)
    assert (body['code'], body['msg']) == (200, '更新成功')
    row = phone_rows(ok_run)[PHONE_A['imsi']]
    assert (row['account'], row['xhs_id']) == ('小美🙂的日常 “引号” & =', '95012345678')


@pytest.mark.parametrize('encoding', ['form', 'json', 'text', 'json_no_content_type', 'multipart'])
def test_body_beats_query_on_name_clash(app, ok_run, encoding):
    path = LOG + '?' + urllib.parse.urlencode({'log_msg': '来自查询串', 'ip_addr': '10.0.0.9'})
    body = send(app, path, {'log_msg': '来自正文'}, encoding)
    assert body['code'] == 200
    assert log_msgs(ok_run) == ['来自正文']
    assert models.Log.get().ip_addr == '10.0.0.9'


@pytest.mark.parametrize('encoding', ['query', 'form', 'json', 'multipart'])
def test_values_are_stripped_of_surrounding_whitespace(app, ok_run, encoding):
    params = {'imsi': '  %s\n' % PHONE_A['imsi'], 'iccid': '\t%s ' % PHONE_A['iccid'],
              'log_msg': ' \t 你好 🙂\r\n'}
    assert send(app, LOG, params, encoding)['code'] == 200
    assert log_msgs(ok_run) == ['你好 🙂']
    assert list(phone_rows(ok_run)) == [PHONE_A['imsi']]
    assert phone_rows(ok_run)[PHONE_A['imsi']]['iccid'] == PHONE_A['iccid']


@pytest.mark.parametrize('value', ['', ' \t \r\n'])
@pytest.mark.parametrize('encoding', ['query', 'form', 'json', 'multipart'])
def test_empty_value_counts_as_missing(app, ok_run, encoding, value):
    body = send(app, LOG, dict(PHONE_A, log_msg=value), encoding)
    assert (body['code'], body['msg']) == (301, '缺少参数: log_msg')
    assert log_msgs(ok_run) == []


def test_json_null_sim_counts_as_missing_or_invalid(app, ok_run):
    body = post_json(app, IS_UPDATE, {'imsi': None, 'iccid': PHONE_A['iccid']})
    assert body['code'] == 301 and 'imsi' in body['msg']
    assert phone_rows(ok_run) == {}


@pytest.mark.parametrize('number', [2, 2.0, '2', ' 2 '])
def test_numbers_may_come_as_json_numbers_or_strings(app, ok_run, tmp_path, number):
    import_profiles(ok_run, tmp_path)
    body = post_json(app, PROFILES, dict(PHONE_A, get_info_number=number))
    assert body['code'] == 200
    assert len(body['data']['ret_data']) == 2


def test_task_id_as_json_number_completes_the_task(app, ok_run):
    task = add_release(ok_run, '笔记')
    assert app.ok(RELEASE, PHONE_A)['data']['id'] == task
    body = post_json(app, UPLOAD, dict(PHONE_A, task_id=task, url=NOTE_URL))
    assert (body['code'], body['msg']) == (200, '提交成功')
    assert task_rows(ok_run)[task]['status'] == 'done'


def test_unknown_parameters_are_ignored(app):
    params = dict(PHONE_A, t='phone', user_id='12', timestamp='1733212800', rand_str='abc',
                  xhs_version='8.1.0', anything_else='值')
    body = app.call(IS_UPDATE, params, method='POST', encoding='form')
    assert (body['code'], body['data']) == (200, {'is_update': True})


@pytest.mark.parametrize('body,content_type', [
    (b'{"log_msg": "x"', 'application/json'),
    (b'{not json at all', 'application/json'),
    (b'\xff\xfe\x00garbage', 'application/octet-stream'),
    (b'--xyz\r\nContent-Disposition: form-data; name="log_msg"\r\n\r\nx\r\n--xyz--\r\n', 'multipart/form-data'),
    (b'"just a string"', 'application/json'),
    (b'[1, 2, 3]', 'application/json'),
    (b'%%%=%%%&&==', 'application/x-www-form-urlencoded'),
])
def test_malformed_bodies_answer_the_envelope_with_301(app, ok_run, body, content_type):
    answer = strict_envelope(raw(app, LOG, body, content_type))
    assert answer['code'] == 301
    assert log_msgs(ok_run) == []


def test_multipart_large_text_part_is_still_text(app):
    data = sample('note.png')
    res = app.post(DM_SHOT, params=dict(PHONE_A, name='路人甲', img_base64_data=b64s(data)),
                   content_type='multipart/form-data')
    body = strict_envelope(res)
    assert body['code'] == 200
    assert app.get(media_path(body['data']['key'])).body == data


# --------------------------------------------------------------------------
# §1 Phone identity: SIM checks on every endpoint that needs a SIM
# --------------------------------------------------------------------------

SIM_ENDPOINTS = {
    'update_userinfo': (USERINFO, {k: v for k, v in ACCOUNT.items() if k not in PHONE_A}),
    'update_reading_update_time': (READING, {}),
    'is_update_userinfo': (IS_UPDATE, {}),
    'check_updated_today': (UPDATED_TODAY, {}),
    'get_release_task': (RELEASE, {}),
    'dm_save_screenshots': (DM_SHOT, {'name': '路人甲', 'img_base64_data': b64s(tiny_png(1))}),
    'get_reply': (GET_REPLY, {}),
    'get_screenshot_time': (SHOT_TIME, {}),
    'get_phone_work_status': (WORK_STATUS, {'phone_type': '2'}),
    'get_phone_number': (NUMBER, {}),
    'article_save_screenshots': (ARTICLE_SHOT, {'img_base64_data': b64s(tiny_png(2))}),
}


@pytest.mark.parametrize('field', ['imsi', 'iccid'])
@pytest.mark.parametrize('endpoint', list(SIM_ENDPOINTS))
def test_sim_endpoint_missing_sim_field_is_named(app, ok_run, endpoint, field):
    path, extra = SIM_ENDPOINTS[endpoint]
    params = dict(PHONE_A, **extra)
    del params[field]
    body = app.call(path, params, method='POST', encoding='form')
    assert (body['code'], body['msg']) == (301, '缺少参数: ' + field)
    assert phone_rows(ok_run) == {}
    assert media_files() == []


@pytest.mark.parametrize('field,value', [('imsi', 'null'), ('iccid', '00000000000000000000')])
@pytest.mark.parametrize('endpoint', list(SIM_ENDPOINTS))
def test_sim_endpoint_refuses_placeholder_sim(app, ok_run, endpoint, field, value):
    path, extra = SIM_ENDPOINTS[endpoint]
    params = dict(PHONE_A, **extra)
    params[field] = value
    body = app.call(path, params, method='POST', encoding='form')
    assert (body['code'], body['msg']) == (301, '参数无效: ' + field)
    assert phone_rows(ok_run) == {}
    assert media_files() == []


INVALID_SIM_VALUES = ['null', 'NULL', 'Null', 'none', 'None', 'undefined', 'unknown', 'UNKNOWN', '00000',
                      '0000000000000000000', '1234', 'a' * 33, '4600-11234567', '46001 1234567',
                      '460011234567801!', '４６００１１２３４５']


@pytest.mark.parametrize('endpoint', [name for name in SIM_ENDPOINTS if name != 'get_phone_work_status'])
def test_every_phone_request_stamps_activity(app, ok_run, endpoint):
    register(ok_run, PHONE_A, 'A-01')
    assert phone_rows(ok_run)[PHONE_A['imsi']]['last_seen'] is None
    path, extra = SIM_ENDPOINTS[endpoint]
    assert app.call(path, dict(PHONE_A, **extra), method='POST', encoding='form')['code'] == 200
    row = phone_rows(ok_run)[PHONE_A['imsi']]
    assert row['last_seen'] is not None and row['active'] is True
    assert app.ok(WORK_STATUS, dict(PHONE_A, phone_type='2'))['data']['flag'] is False


@pytest.mark.parametrize('field,value', [('imsi', v) for v in INVALID_SIM_VALUES]
                         + [('iccid', v) for v in ('NULL', 'undefined', '00000000000000000000', '8986-0112')])
def test_invalid_sim_values_are_refused(app, ok_run, field, value):
    params = dict(PHONE_A)
    params[field] = value
    body = app.call(IS_UPDATE, params, method='POST', encoding='json')
    assert (body['code'], body['msg']) == (301, '参数无效: ' + field)
    assert phone_rows(ok_run) == {}


@pytest.mark.parametrize('sim', [{'imsi': 'abcDE', 'iccid': '12345'}, {'imsi': 'x' * 32, 'iccid': '9' * 32}])
def test_sim_values_of_5_to_32_alphanumerics_are_accepted(app, ok_run, sim):
    assert app.ok(IS_UPDATE, sim)['data'] == {'is_update': True}
    assert list(phone_rows(ok_run)) == [sim['imsi']]


# --------------------------------------------------------------------------
# xhs_phone_log/add
# --------------------------------------------------------------------------

def test_log_add_stores_line_registers_phone_and_records_caller(app, ok_run):
    body = app.ok(LOG, dict(PHONE_A, log_msg='已查询完评论信息 🙂', macaddr='AA:BB:CC:00:11:01\n',
                            ip_addr='192.168.1.55', phone_type='2'), method='POST', encoding='form')
    assert (body['msg'], body['data']) == ('日志纪录成功', {})
    [row] = cli_json(ok_run, 'logs')
    assert (row['msg'], row['remote'], row['phone']) == ('已查询完评论信息 🙂', '192.168.1.101', PHONE_A['imsi'])
    phone = phone_rows(ok_run)[PHONE_A['imsi']]
    assert (phone['mac'], phone['type'], phone['active']) == ('aa:bb:cc:00:11:01', 2, True)


def test_log_add_without_log_msg_is_refused(app, ok_run):
    body = app.call(LOG, dict(PHONE_A, macaddr='aa:bb:cc:00:11:01'), method='POST', encoding='form')
    assert (body['code'], body['msg']) == (301, '缺少参数: log_msg')
    assert log_msgs(ok_run) == []


def test_log_add_needs_no_metadata(app, ok_run):
    assert app.ok(LOG, {'log_msg': '无身份'})['msg'] == '日志纪录成功'
    assert log_msgs(ok_run) == ['无身份']
    assert phone_rows(ok_run) == {}


@pytest.mark.parametrize('meta', [
    {'imsi': 'null', 'iccid': 'undefined'},
    {'imsi': '0000000000', 'iccid': PHONE_A['iccid']},
    {'imsi': PHONE_A['imsi'], 'iccid': 'unknown', 'macaddr': 'not-a-mac', 'phone_type': 'abc'},
    {'macaddr': '02:00:00:00:00:00', 'phone_type': '1'},
    {'macaddr': 'zz:zz', 'phone_type': '1', 'ip_addr': '本机'},
])
def test_log_line_with_bad_metadata_is_kept_as_sent_and_identifies_no_phone(app, ok_run, meta):
    body = app.call(LOG, dict(meta, log_msg='坏元数据'), method='POST', encoding='form')
    assert (body['code'], body['msg']) == (200, '日志纪录成功')
    row = models.Log.get()
    assert row.msg == '坏元数据' and row.phone_id is None
    for name, value in meta.items():
        assert getattr(row, name) == value
    assert phone_rows(ok_run) == {}


def test_log_add_from_coverage_phone_registers_it_by_mac(app, ok_run):
    app.ok(LOG, {'log_msg': '覆盖检查', 'macaddr': ' 5C-CF-7F-00-00-01\n', 'phone_type': '1'})
    phone = phone_rows(ok_run)['5c:cf:7f:00:00:01']
    assert (phone['imsi'], phone['type']) == (None, 1)


COVERAGE_MAC = '5c:cf:7f:00:00:01'
BY_MAC = {'imsi': 'null', 'iccid': 'null', 'macaddr': '5C:CF:7F:00:00:01', 'phone_type': '1'}


def test_coverage_phone_registered_with_its_sim_is_found_by_mac_without_it(app, ok_run):
    ok_run('phones', 'add', '--imsi', PHONE_A['imsi'], '--iccid', PHONE_A['iccid'],
           '--mac', COVERAGE_MAC, '--type', '1', '--label', 'C-01')
    assert work_status(app, BY_MAC)['data']['reason'] == '超过5分钟无活动'   # never seen yet
    app.ok(LOG, dict(BY_MAC, log_msg='读不到SIM'))
    data = work_status(app, BY_MAC)['data']
    assert (data['flag'], data['reason']) == (False, '') and data['last_seen']
    assert list(phone_rows(ok_run)) == [PHONE_A['imsi']]   # no second phone for the MAC
    assert [row['phone'] for row in cli_json(ok_run, 'logs')] == ['C-01']


def test_a_phone_known_by_its_mac_alone_comes_first_and_publishing_phones_never(app, ok_run):
    ok_run('phones', 'add', '--imsi', PHONE_B['imsi'], '--iccid', PHONE_B['iccid'],
           '--mac', COVERAGE_MAC, '--type', '2', '--label', 'P-01')
    assert work_status(app, BY_MAC)['msg'] == '该手机不存在'   # a publishing phone is its SIM
    app.ok(LOG, dict(BY_MAC, log_msg='只有MAC'))
    ok_run('phones', 'add', '--imsi', PHONE_A['imsi'], '--iccid', PHONE_A['iccid'],
           '--mac', COVERAGE_MAC, '--type', '1', '--label', 'C-01')
    app.ok(LOG, dict(BY_MAC, log_msg='还是只有MAC'))
    rows = phone_rows(ok_run)
    assert rows[COVERAGE_MAC]['imsi'] is None and rows[COVERAGE_MAC]['last_seen']
    assert {row['phone'] for row in cli_json(ok_run, 'logs')} == {COVERAGE_MAC}   # not the 'null' it sent
    assert not rows[PHONE_A['imsi']]['last_seen'] and not rows[PHONE_B['imsi']]['last_seen']


# --------------------------------------------------------------------------
# xiaohongshu_userprofile
# --------------------------------------------------------------------------

def test_update_userinfo_binds_account_to_sim(app, ok_run):
    body = app.ok(USERINFO, ACCOUNT, method='POST', encoding='form')
    assert (body['msg'], body['data']) == ('更新成功', {})
    phone = phone_rows(ok_run)[PHONE_A['imsi']]
    assert (phone['account'], phone['xhs_id'], phone['mac']) == ('小美的日常', '95012345678', 'aa:bb:cc:00:11:01')


@pytest.mark.parametrize('field', ['phone_num', 'imsi', 'iccid', 'name', 'xiaohongshu_id', 'home_url',
                                   'macaddr', 'platform'])
def test_update_userinfo_missing_field_is_named(app, ok_run, field):
    params = dict(ACCOUNT)
    del params[field]
    body = app.call(USERINFO, params, method='POST', encoding='form')
    assert (body['code'], body['msg']) == (301, '缺少参数: ' + field)
    assert phone_rows(ok_run) == {}


@pytest.mark.parametrize('field,value', [
    ('phone_num', 'abc'), ('phone_num', '12'), ('macaddr', 'zz:zz:zz:zz:zz:zz'), ('macaddr', '12345'),
    ('platform', 'x'), ('platform', '1.5'), ('imsi', 'null'), ('iccid', '000000000000'),
])
def test_update_userinfo_invalid_field_is_named_and_nothing_stored(app, ok_run, field, value):
    params = dict(ACCOUNT)
    params[field] = value
    body = app.call(USERINFO, params, method='POST', encoding='form')
    assert (body['code'], body['msg']) == (301, '参数无效: ' + field)
    assert phone_rows(ok_run) == {}


@pytest.mark.parametrize('mac,stored', [
    ('AA:BB:CC:00:11:01', 'aa:bb:cc:00:11:01'), ('aa-bb-cc-00-11-01', 'aa:bb:cc:00:11:01'),
    ('AABBCC001101', 'aa:bb:cc:00:11:01'), ('  aa:bb:cc:00:11:01\n', 'aa:bb:cc:00:11:01'),
    ('02:00:00:00:00:00', None),
])
def test_update_userinfo_normalises_mac(app, ok_run, mac, stored):
    app.ok(USERINFO, dict(ACCOUNT, macaddr=mac), method='POST', encoding='form')
    assert phone_rows(ok_run)[PHONE_A['imsi']]['mac'] == stored


def test_update_userinfo_repeat_updates_the_account(app, ok_run):
    app.ok(USERINFO, ACCOUNT)
    body = app.call(USERINFO, dict(ACCOUNT, name='改名后🙂'), method='POST', encoding='json')
    assert (body['code'], body['msg']) == (200, '更新成功')
    phone = phone_rows(ok_run)[PHONE_A['imsi']]
    assert (phone['account'], phone['xhs_id']) == ('改名后🙂', '95012345678')
    assert len(phone_rows(ok_run)) == 1


def test_xiaohongshu_id_moves_to_new_sim_and_move_is_logged(app, ok_run):
    app.ok(USERINFO, ACCOUNT)
    app.ok(USERINFO, dict(ACCOUNT, **PHONE_B))
    phones = phone_rows(ok_run)
    assert phones[PHONE_A['imsi']]['xhs_id'] is None
    assert phones[PHONE_B['imsi']]['xhs_id'] == '95012345678'
    assert [msg for msg in log_msgs(ok_run) if '95012345678' in msg] != []


def test_is_update_userinfo_follows_binding_and_operator_refresh_flag(app, ok_run):
    def is_update():
        body = app.ok(IS_UPDATE, PHONE_A)
        assert body['msg'] == '查询成功'
        return body['data']['is_update']
    assert is_update() is True
    app.ok(USERINFO, ACCOUNT)
    assert is_update() is False
    ok_run('phones', 'set', PHONE_A['imsi'], '--refresh-profile')
    assert is_update() is True
    app.ok(USERINFO, ACCOUNT)
    assert is_update() is False


def test_reading_update_time_clears_check_updated_today_until_tomorrow(app, clock):
    def flag():
        body = app.ok(UPDATED_TODAY, PHONE_A)
        assert body['msg'] == '查询成功'
        return body['data']['flag']
    clock.set(today_at(10))
    assert flag() is True
    body = app.ok(READING, PHONE_A, method='POST', encoding='form')
    assert (body['msg'], body['data']) == ('修改成功', {})
    assert flag() is False
    clock.set(today_at(23, 59))
    assert flag() is False
    clock.set(today_at(10) + 86400)
    assert flag() is True


# --------------------------------------------------------------------------
# xiaohongshu_biji: release tasks
# --------------------------------------------------------------------------

def test_release_poll_with_nothing_queued_answers_no_task(app):
    body = app.call(RELEASE, PHONE_A)
    assert (body['code'], body['msg'], body['data']) == (200, '当前无任务', {})


def test_release_task_carries_content_title_images_topics(app, ok_run, tmp_path):
    content = '{"title": "秋天的第一杯奶茶", "tags": ["🍂"], "body": "第一行\\n第二行"}'
    task = add_release(ok_run, content, '--title', '奶茶🍂', '--topic', '秋天', '--topic', '奶茶',
                       '--image', os.path.join(os.path.dirname(__file__), 'samples', 'dm.png'),
                       '--image', 'https://cdn.example.invalid/x.jpg', '--platform', '1')
    body = app.ok(RELEASE, PHONE_A, method='POST', encoding='form')
    data = body['data']
    assert {k: data[k] for k in ('id', 'content', 'platform', 'title', 'topics')} == {
        'id': task, 'content': content, 'platform': 1, 'title': '奶茶🍂', 'topics': ['秋天', '奶茶']}
    assert len(data['images']) == 2 and data['images'][1] == 'https://cdn.example.invalid/x.jpg'
    assert app.get(media_path(data['images'][0])).body == sample('dm.png')


def test_claimed_task_is_redelivered_to_same_phone(app, ok_run):
    task = add_release(ok_run, '笔记一')
    assert app.ok(RELEASE, PHONE_A)['data']['id'] == task
    assert app.ok(RELEASE, PHONE_A, method='POST', encoding='json')['data']['id'] == task
    assert app.ok(RELEASE, PHONE_A)['data']['id'] == task
    row = task_rows(ok_run)[task]
    assert (row['status'], row['phone']) == ('claimed', PHONE_A['imsi'])


def test_claimed_task_never_goes_to_another_phone(app, ok_run):
    first = add_release(ok_run, '笔记一')
    assert app.ok(RELEASE, PHONE_A)['data']['id'] == first
    body = app.ok(RELEASE, PHONE_B)
    assert (body['msg'], body['data']) == ('当前无任务', {})
    second = add_release(ok_run, '笔记二')
    assert app.ok(RELEASE, PHONE_B)['data']['id'] == second
    assert app.ok(RELEASE, PHONE_A)['data']['id'] == first
    assert app.ok(RELEASE, PHONE_B)['data']['id'] == second


def test_published_task_is_not_handed_out_again(app, ok_run):
    first = add_release(ok_run, '笔记一')
    second = add_release(ok_run, '笔记二')
    assert app.ok(RELEASE, PHONE_A)['data']['id'] == first
    app.ok(UPLOAD, {'task_id': first, 'url': NOTE_URL})
    assert app.ok(RELEASE, PHONE_A)['data']['id'] == second
    app.ok(UPLOAD, {'task_id': second, 'url': OTHER_NOTE_URL})
    assert app.ok(RELEASE, PHONE_A)['data'] == {}


def test_targeted_task_goes_only_to_its_phone(app, ok_run):
    register(ok_run, PHONE_A, 'A-01')
    register(ok_run, PHONE_B, 'B-01')
    task = add_release(ok_run, '只给A', '--phone', 'A-01')
    assert app.ok(RELEASE, PHONE_B)['data'] == {}
    assert app.ok(RELEASE, PHONE_C)['data'] == {}
    assert app.ok(RELEASE, PHONE_A)['data']['id'] == task


def test_targeted_task_comes_before_older_higher_priority_untargeted(app, ok_run):
    register(ok_run, PHONE_A, 'A-01')
    untargeted = add_release(ok_run, '大家的', '--priority', '9')
    targeted = add_release(ok_run, '只给A', '--phone', 'A-01')
    assert app.ok(RELEASE, PHONE_A)['data']['id'] == targeted
    assert app.ok(RELEASE, PHONE_B)['data']['id'] == untargeted


def test_account_targeted_task_goes_only_to_phone_holding_account(app, ok_run):
    task = add_release(ok_run, '给账号', '--account', ACCOUNT['xiaohongshu_id'])
    app.ok(USERINFO, ACCOUNT)
    assert app.ok(RELEASE, PHONE_B)['data'] == {}
    assert app.ok(RELEASE, PHONE_A)['data']['id'] == task


def test_higher_priority_first_then_oldest(app, ok_run):
    low = add_release(ok_run, '低', '--priority', '0')
    high_old = add_release(ok_run, '高旧', '--priority', '5')
    high_new = add_release(ok_run, '高新', '--priority', '5')
    assert app.ok(RELEASE, PHONE_A)['data']['id'] == high_old
    assert app.ok(RELEASE, PHONE_B)['data']['id'] == high_new
    assert app.ok(RELEASE, PHONE_C)['data']['id'] == low


def test_scheduled_task_waits_for_its_time(app, ok_run, clock):
    later = add_release(ok_run, '两小时后', '--at', '+2h', '--priority', '9')
    past = add_release(ok_run, '早就该发', '--at', '2020-01-01 10:00')
    assert app.ok(RELEASE, PHONE_A)['data']['id'] == past
    assert app.ok(RELEASE, PHONE_B)['data'] == {}
    clock.advance(3 * 3600)
    assert app.ok(RELEASE, PHONE_B)['data']['id'] == later


def test_offline_phone_gets_no_task_until_back_online(app, ok_run):
    register(ok_run, PHONE_A, 'A-01')
    task = add_release(ok_run, '笔记')
    reply = add_reply(ok_run, 'A-01')
    ok_run('phones', 'set', 'A-01', '--offline')
    assert app.ok(RELEASE, PHONE_A)['data'] == {}
    assert app.ok(GET_REPLY, PHONE_A)['data'] == {}
    ok_run('phones', 'set', 'A-01', '--online')
    assert app.ok(RELEASE, PHONE_A)['data']['id'] == task
    assert app.ok(GET_REPLY, PHONE_A)['data']['id'] == reply


def test_offline_phone_task_stays_queued_for_others(app, ok_run):
    register(ok_run, PHONE_A, 'A-01')
    ok_run('phones', 'set', 'A-01', '--offline')
    task = add_release(ok_run, '笔记')
    assert app.ok(RELEASE, PHONE_A)['data'] == {}
    assert app.ok(RELEASE, PHONE_B)['data']['id'] == task


def test_operator_requeue_lets_another_phone_take_the_task(app, ok_run):
    task = add_release(ok_run, '笔记')
    assert app.ok(RELEASE, PHONE_A)['data']['id'] == task
    ok_run('tasks', 'requeue', str(task))
    assert app.ok(RELEASE, PHONE_B)['data']['id'] == task
    assert app.ok(RELEASE, PHONE_A)['data'] == {}


def test_operator_cancel_stops_redelivery(app, ok_run):
    task = add_release(ok_run, '笔记')
    assert app.ok(RELEASE, PHONE_A)['data']['id'] == task
    ok_run('tasks', 'cancel', str(task))
    assert app.ok(RELEASE, PHONE_A)['data'] == {}


# --------------------------------------------------------------------------
# xiaohongshu_biji/upload_url
# --------------------------------------------------------------------------

@pytest.fixture
def claimed(app, ok_run):
    """A release task phone A was handed."""
    task = add_release(ok_run, '笔记')
    assert app.ok(RELEASE, PHONE_A)['data']['id'] == task
    return task


def test_upload_url_marks_note_published(app, ok_run, claimed):
    body = app.call(UPLOAD, {'task_id': claimed, 'url': NOTE_URL}, method='POST', encoding='form')
    assert (body['code'], body['msg'], body['data']) == (200, '提交成功', {})
    row = task_rows(ok_run)[claimed]
    assert (row['status'], row['result_url'], row['phone']) == ('done', NOTE_URL, PHONE_A['imsi'])
    assert row['done_at'] is not None


@pytest.mark.parametrize('field', ['task_id', 'url'])
def test_upload_url_missing_field_is_named(app, ok_run, claimed, field):
    params = {'task_id': claimed, 'url': NOTE_URL}
    del params[field]
    body = app.call(UPLOAD, params, method='POST', encoding='form')
    assert (body['code'], body['msg']) == (301, '缺少参数: ' + field)
    assert task_rows(ok_run)[claimed]['status'] == 'claimed'


@pytest.mark.parametrize('task_id', ['abc', '0', '-1', '1.5', '12abc', 'null', '1e400', '99999999999999999999999'])
def test_upload_url_invalid_task_id_is_refused(app, ok_run, claimed, task_id):
    body = app.call(UPLOAD, {'task_id': task_id, 'url': NOTE_URL}, method='POST', encoding='form')
    assert (body['code'], body['msg']) == (301, '参数无效: task_id')
    assert task_rows(ok_run)[claimed]['status'] == 'claimed'


@pytest.mark.parametrize('url', ['ftp://www.xiaohongshu.com/explore/6751c0de000000000b00aa01',
                                 'www.xiaohongshu.com/explore/6751c0de000000000b00aa01', 'http://',
                                 'https:///explore/1', 'javascript:alert(1)', '笔记链接', 'null'])
def test_upload_url_invalid_url_is_refused(app, ok_run, claimed, url):
    body = app.call(UPLOAD, {'task_id': claimed, 'url': url}, method='POST', encoding='form')
    assert (body['code'], body['msg']) == (301, '参数无效: url')
    assert task_rows(ok_run)[claimed]['status'] == 'claimed'


def test_upload_url_accepts_http_and_https_case_insensitive(app, ok_run):
    first = add_release(ok_run, '一')
    second = add_release(ok_run, '二')
    app.ok(UPLOAD, {'task_id': first, 'url': 'http://xhslink.com/a/AbCdEf'})
    app.ok(UPLOAD, {'task_id': second, 'url': 'HTTPS://WWW.XIAOHONGSHU.COM/explore/6751c0de000000000b00cc03'})
    assert [task_rows(ok_run)[t]['status'] for t in (first, second)] == ['done', 'done']


def test_upload_url_unknown_task_is_refused(app, ok_run, claimed):
    body = app.call(UPLOAD, {'task_id': claimed + 1000, 'url': NOTE_URL})
    assert (body['code'], body['msg']) == (301, '任务不存在')
    assert task_rows(ok_run)[claimed]['status'] == 'claimed'


def test_upload_url_with_reply_task_id_is_unknown_task(app, ok_run):
    register(ok_run, PHONE_A, 'A-01')
    reply = add_reply(ok_run, 'A-01')
    body = app.call(UPLOAD, {'task_id': reply, 'url': NOTE_URL})
    assert (body['code'], body['msg']) == (301, '任务不存在')
    row = task_rows(ok_run)[reply]
    assert (row['status'], row['result_url']) == ('pending', None)


@pytest.mark.parametrize('again', [
    NOTE_URL,
    'https://www.xiaohongshu.com/explore/6751c0de000000000b00aa01',
    'https://www.xiaohongshu.com/explore/6751c0de000000000b00aa01?xsec_token=ZZ99#comments',
    'https://www.xiaohongshu.com/discovery/item/6751c0de000000000b00aa01?app_platform=android',
])
def test_upload_url_repeated_for_same_note_changes_nothing(app, ok_run, claimed, again):
    app.ok(UPLOAD, {'task_id': claimed, 'url': NOTE_URL})
    before = task_rows(ok_run)[claimed]
    body = app.call(UPLOAD, {'task_id': claimed, 'url': again}, method='POST', encoding='form')
    assert (body['code'], body['msg']) == (200, '提交成功')
    assert task_rows(ok_run)[claimed] == before


def test_upload_url_with_different_note_conflicts(app, ok_run, claimed):
    app.ok(UPLOAD, {'task_id': claimed, 'url': NOTE_URL})
    before = task_rows(ok_run)[claimed]
    body = app.call(UPLOAD, {'task_id': claimed, 'url': OTHER_NOTE_URL}, method='POST', encoding='form')
    assert (body['code'], body['msg']) == (301, '状态冲突')
    assert task_rows(ok_run)[claimed] == before


def test_upload_url_from_another_phones_sim_is_refused(app, ok_run, claimed):
    body = app.call(UPLOAD, dict(PHONE_B, task_id=claimed, url=NOTE_URL), method='POST', encoding='form')
    assert body['code'] == 301
    row = task_rows(ok_run)[claimed]
    assert (row['status'], row['result_url'], row['phone']) == ('claimed', None, PHONE_A['imsi'])


def test_upload_url_from_owning_phones_sim_is_accepted(app, ok_run, claimed):
    body = app.call(UPLOAD, dict(PHONE_A, task_id=claimed, url=NOTE_URL), method='POST', encoding='json')
    assert (body['code'], body['msg']) == (200, '提交成功')
    assert task_rows(ok_run)[claimed]['status'] == 'done'


# --------------------------------------------------------------------------
# xiaohongshu_direct_essages
# --------------------------------------------------------------------------

def test_dm_screenshot_is_stored_with_phone_and_counterpart(app, ok_run):
    data = sample('dm.png')
    body = app.ok(DM_SHOT, dict(PHONE_A, name='路人甲🙂', img_base64_data=b64('dm.png')),
                  method='POST', encoding='form')
    assert body['msg'] == '保存成功'
    key = body['data']['key']
    assert re.match(r'^http://192\.168\.1\.10:8000/media/[^/]+\.png$', key), key
    assert app.get(media_path(key)).body == data
    shot = models.Screenshot.get()
    assert (shot.kind, shot.counterpart, shot.phone.imsi) == ('dm', '路人甲🙂', PHONE_A['imsi'])
    assert len(media_files()) == 1


@pytest.mark.parametrize('field', ['name', 'img_base64_data'])
def test_dm_screenshot_missing_field_is_named(app, field):
    params = dict(PHONE_A, name='路人甲', img_base64_data=b64('dm.png'))
    del params[field]
    body = app.call(DM_SHOT, params, method='POST', encoding='form')
    assert (body['code'], body['msg']) == (301, '缺少参数: ' + field)
    assert media_files() == []
    assert models.Screenshot.select().count() == 0


def test_resent_dm_screenshot_is_stored_once_with_same_url(app):
    params = dict(PHONE_A, name='路人甲', img_base64_data=b64('dm.jpg'))
    first = app.ok(DM_SHOT, params, method='POST', encoding='form')['data']['key']
    second = app.ok(DM_SHOT, params, method='POST', encoding='json')['data']['key']
    assert first == second
    assert len(media_files()) == 1
    assert models.Screenshot.select().count() == 1


def test_get_reply_hands_phone_its_dm_reply(app, ok_run):
    register(ok_run, PHONE_A, 'A-01')
    task = add_reply(ok_run, 'A-01', name='路人甲', msg='您好，已收到～ 稍后发您链接🙂')
    body = app.ok(GET_REPLY, PHONE_A, method='POST', encoding='form')
    assert {k: body['data'][k] for k in ('id', 'name', 'msg', 'platform')} == {
        'id': task, 'name': '路人甲', 'msg': '您好，已收到～ 稍后发您链接🙂', 'platform': 1}


def test_get_reply_with_nothing_answers_no_task(app, ok_run):
    register(ok_run, PHONE_A, 'A-01')
    add_reply(ok_run, 'A-01')
    body = app.call(GET_REPLY, PHONE_B)
    assert (body['code'], body['msg'], body['data']) == (200, '当前无任务', {})


def test_dm_reply_is_redelivered_until_saved(app, ok_run):
    register(ok_run, PHONE_A, 'A-01')
    first = add_reply(ok_run, 'A-01', name='甲')
    second = add_reply(ok_run, 'A-01', name='乙')
    assert app.ok(GET_REPLY, PHONE_A)['data']['id'] == first
    assert app.ok(GET_REPLY, PHONE_A)['data']['id'] == first
    body = app.ok(REPLY_SAVE, {'task_id': first}, method='POST', encoding='form')
    assert (body['msg'], body['data']) == ('操作完成', {})
    assert task_rows(ok_run)[first]['status'] == 'done'
    assert app.ok(GET_REPLY, PHONE_A)['data']['id'] == second
    app.ok(REPLY_SAVE, {'task_id': second})
    assert app.ok(GET_REPLY, PHONE_A)['data'] == {}


def test_reply_save_repeated_changes_nothing(app, ok_run):
    register(ok_run, PHONE_A, 'A-01')
    task = add_reply(ok_run, 'A-01')
    app.ok(GET_REPLY, PHONE_A)
    app.ok(REPLY_SAVE, {'task_id': task})
    before = task_rows(ok_run)[task]
    body = app.call(REPLY_SAVE, {'task_id': task}, method='POST', encoding='json')
    assert (body['code'], body['msg']) == (200, '操作完成')
    assert task_rows(ok_run)[task] == before


@pytest.mark.parametrize('kind', ['unknown', 'release'])
def test_reply_save_for_no_such_reply_task_is_refused(app, ok_run, kind):
    register(ok_run, PHONE_A, 'A-01')
    reply = add_reply(ok_run, 'A-01')
    task_id = reply + 100 if kind == 'unknown' else add_release(ok_run, '笔记')
    before = task_rows(ok_run)
    body = app.call(REPLY_SAVE, {'task_id': task_id})
    assert (body['code'], body['msg']) == (301, '任务不存在')
    assert task_rows(ok_run) == before


@pytest.mark.parametrize('value,msg', [(None, '缺少参数: task_id'), ('', '缺少参数: task_id'),
                                       ('abc', '参数无效: task_id'), ('0', '参数无效: task_id'),
                                       ('-5', '参数无效: task_id'), ('2.5', '参数无效: task_id')])
def test_reply_save_bad_task_id_is_refused(app, value, msg):
    body = app.call(REPLY_SAVE, {} if value is None else {'task_id': value}, method='POST', encoding='form')
    assert (body['code'], body['msg']) == (301, msg)


@pytest.mark.parametrize('hour,minute,expected', [(9, 0, 20), (10, 0, 20), (21, 59, 20), (22, 0, 120),
                                                  (23, 30, 120), (0, 0, 120), (8, 59, 120)])
def test_screenshot_time_day_and_night_defaults(app, clock, hour, minute, expected):
    clock.set(today_at(hour, minute))
    body = app.ok(SHOT_TIME, PHONE_A)
    assert body['msg'] == '查询成功'
    value = body['data']['screenshot_time']
    assert value == expected and type(value) is int


def test_screenshot_time_follows_global_settings(app, ok_run, clock):
    ok_run('settings', 'rest_day', '30')
    ok_run('settings', 'rest_night', '240')
    clock.set(today_at(12))
    assert app.ok(SHOT_TIME, PHONE_A)['data']['screenshot_time'] == 30
    clock.set(today_at(2))
    assert app.ok(SHOT_TIME, PHONE_A)['data']['screenshot_time'] == 240


def test_screenshot_time_per_phone_override(app, ok_run, clock):
    register(ok_run, PHONE_A, 'A-01')
    ok_run('phones', 'set', 'A-01', '--rest-day', '45')
    clock.set(today_at(12))
    assert app.ok(SHOT_TIME, PHONE_A)['data']['screenshot_time'] == 45
    assert app.ok(SHOT_TIME, PHONE_B)['data']['screenshot_time'] == 20
    clock.set(today_at(23))
    assert app.ok(SHOT_TIME, PHONE_A)['data']['screenshot_time'] == 120
    ok_run('phones', 'set', 'A-01', '--rest-night', '0')
    assert app.ok(SHOT_TIME, PHONE_A)['data']['screenshot_time'] == 0


# --------------------------------------------------------------------------
# xhs_phone_management/get_phone_work_status
# --------------------------------------------------------------------------

def work_status(app, params, encoding='query'):
    return app.call(WORK_STATUS, params, method='POST' if encoding != 'query' else 'GET', encoding=encoding)


def test_work_status_normal_right_after_activity(app, clock):
    app.ok(LOG, dict(PHONE_A, log_msg='心跳'))
    body = work_status(app, dict(PHONE_A, phone_type='2'))
    assert (body['code'], body['data']['flag'], body['note']) == (200, False, {'flag': '如果为True 则异常'})


def test_work_status_abnormal_after_activity_window(app, ok_run, clock):
    app.ok(LOG, dict(PHONE_A, log_msg='心跳'))
    clock.advance(299)
    assert work_status(app, dict(PHONE_A, phone_type=2))['data']['flag'] is False
    clock.advance(2)
    body = work_status(app, dict(PHONE_A, phone_type=2))
    assert (body['code'], body['data']['flag'], body['note']) == (200, True, {'flag': '如果为True 则异常'})
    assert body['data']['reason'] != ''


def test_work_status_activity_window_is_settable(app, ok_run, clock):
    ok_run('settings', 'activity_window', '10')
    app.ok(LOG, dict(PHONE_A, log_msg='心跳'))
    clock.advance(9 * 60)
    assert work_status(app, dict(PHONE_A, phone_type=2))['data']['flag'] is False
    clock.advance(2 * 60)
    assert work_status(app, dict(PHONE_A, phone_type=2))['data']['flag'] is True


def test_work_status_offline_phone_is_abnormal_with_reason(app, ok_run, clock):
    app.ok(LOG, dict(PHONE_A, log_msg='心跳'))
    app.ok(LOG, dict(PHONE_B, log_msg='心跳'))
    clock.advance(400)
    quiet = work_status(app, dict(PHONE_B, phone_type=2))['data']
    ok_run('phones', 'set', PHONE_A['imsi'], '--offline')
    body = work_status(app, dict(PHONE_A, phone_type=2))
    assert (body['code'], body['data']['flag']) == (200, True)
    assert '离线' in body['data']['reason']
    assert quiet['flag'] is True and quiet['reason'] != body['data']['reason']


def test_work_status_call_is_not_activity(app, ok_run, clock):
    register(ok_run, PHONE_A, 'A-01')
    for _ in range(3):
        body = work_status(app, dict(PHONE_A, phone_type=2), encoding='form')
        assert (body['code'], body['data']['flag']) == (200, True)
    assert phone_rows(ok_run)[PHONE_A['imsi']]['last_seen'] is None


@pytest.mark.parametrize('params', [dict(PHONE_A, phone_type='2'), dict(PHONE_A, phone_type='1'),
                                    {'phone_type': '1', 'macaddr': 'aa:bb:cc:dd:ee:01'}])
def test_work_status_unknown_phone(app, ok_run, params):
    body = work_status(app, params)
    assert (body['code'], body['msg']) == (301, '该手机不存在')
    assert phone_rows(ok_run) == {}


@pytest.mark.parametrize('mac', ['5C:CF:7F:00:00:01', '5c-cf-7f-00-00-01', ' 5ccf7f000001\n'])
def test_work_status_of_coverage_phone_by_mac(app, clock, mac):
    app.ok(LOG, {'log_msg': '覆盖', 'macaddr': '5c:cf:7f:00:00:01', 'phone_type': '1'})
    body = work_status(app, {'phone_type': '1', 'macaddr': mac})
    assert (body['code'], body['data']['flag']) == (200, False)
    clock.advance(600)
    assert work_status(app, {'phone_type': 1, 'macaddr': mac}, 'json')['data']['flag'] is True


@pytest.mark.parametrize('unreadable', ['null', 'undefined', 'unknown', '000000000000000'])
def test_work_status_of_coverage_phone_with_unreadable_sim_goes_by_mac(app, unreadable):
    """Android 10+ sends placeholders for a SIM it can't read; the log line found the phone by MAC."""
    sim = {'imsi': unreadable, 'iccid': unreadable}
    app.ok(LOG, dict(sim, log_msg='覆盖', macaddr='5c:cf:7f:00:00:01', phone_type='1'))
    body = work_status(app, dict(sim, phone_type='1', macaddr='5C:CF:7F:00:00:01'))
    assert (body['code'], body['data']['flag']) == (200, False)
    body = work_status(app, dict(sim, phone_type='2', macaddr='5C:CF:7F:00:00:01'))
    assert (body['code'], body['msg']) == (301, '参数无效: imsi')   # a publishing phone is its SIM


def test_work_status_placeholder_mac_never_identifies_a_phone(app, ok_run):
    app.ok(LOG, {'log_msg': '覆盖', 'macaddr': '02:00:00:00:00:00', 'phone_type': '1'})
    body = work_status(app, {'phone_type': '1', 'macaddr': '02:00:00:00:00:00'})
    assert body['code'] == 301
    assert phone_rows(ok_run) == {}


@pytest.mark.parametrize('params,msg', [
    (dict(PHONE_A), '缺少参数: phone_type'),
    (dict(PHONE_A, phone_type='3'), '参数无效: phone_type'),
    (dict(PHONE_A, phone_type='0'), '参数无效: phone_type'),
    (dict(PHONE_A, phone_type='abc'), '参数无效: phone_type'),
    ({'phone_type': '2', 'iccid': PHONE_A['iccid']}, '缺少参数: imsi'),
    ({'phone_type': '2', 'imsi': PHONE_A['imsi']}, '缺少参数: iccid'),
    ({'phone_type': '1'}, '缺少参数: macaddr'),
    ({'phone_type': '1', 'macaddr': 'zz:zz'}, '参数无效: macaddr'),
])
def test_work_status_bad_parameters(app, params, msg):
    app.ok(LOG, dict(PHONE_A, log_msg='心跳'))
    body = work_status(app, params)
    assert (body['code'], body['msg']) == (301, msg)


# --------------------------------------------------------------------------
# xhs_phone_management/get_phone_number
# --------------------------------------------------------------------------

def import_numbers(ok_run, tmp_path, text):
    path = tmp_path / 'numbers.csv'
    path.write_text(text, encoding='utf-8')
    ok_run('numbers', 'import', str(path))


def bindings(ok_run):
    return {row['number']: row['phone'] for row in cli_json(ok_run, 'numbers', 'list')}


def test_phone_number_is_bound_one_to_one(app, ok_run, tmp_path):
    import_numbers(ok_run, tmp_path, '13900000001\n13900000002\n')
    body = app.ok(NUMBER, PHONE_A, method='POST', encoding='form')
    assert (body['msg'], body['data']) == ('查询成功', {'phone_number': '13900000001'})
    assert app.ok(NUMBER, PHONE_B)['data']['phone_number'] == '13900000002'
    assert app.ok(NUMBER, PHONE_A)['data']['phone_number'] == '13900000001'
    assert app.ok(NUMBER, PHONE_B)['data']['phone_number'] == '13900000002'
    assert bindings(ok_run) == {'13900000001': PHONE_A['imsi'], '13900000002': PHONE_B['imsi']}


def test_phone_number_pool_empty_answers_200_with_empty_number(app, ok_run, tmp_path):
    body = app.call(NUMBER, PHONE_A)
    assert (body['code'], body['msg'], body['data']) == (200, '暂无可用手机号', {'phone_number': ''})
    import_numbers(ok_run, tmp_path, '13900000001\n')
    app.ok(NUMBER, PHONE_A)
    body = app.call(NUMBER, PHONE_B)
    assert (body['code'], body['msg'], body['data']) == (200, '暂无可用手机号', {'phone_number': ''})
    assert bindings(ok_run) == {'13900000001': PHONE_A['imsi']}


def test_pre_assigned_number_goes_to_its_iccid_first(app, ok_run, tmp_path):
    import_numbers(ok_run, tmp_path, 'phone_number,iccid\n13900000001,\n13900000002,%s\n' % PHONE_B['iccid'])
    assert app.ok(NUMBER, PHONE_B)['data']['phone_number'] == '13900000002'
    assert app.ok(NUMBER, PHONE_A)['data']['phone_number'] == '13900000001'


def test_pre_assigned_number_is_kept_for_its_iccid(app, ok_run, tmp_path):
    import_numbers(ok_run, tmp_path, 'phone_number,iccid\n13900000001,%s\n13900000002,\n' % PHONE_B['iccid'])
    assert app.ok(NUMBER, PHONE_A)['data']['phone_number'] == '13900000002'
    assert app.call(NUMBER, PHONE_C)['data'] == {'phone_number': ''}
    assert app.ok(NUMBER, PHONE_B)['data']['phone_number'] == '13900000001'
    assert bindings(ok_run) == {'13900000001': PHONE_B['imsi'], '13900000002': PHONE_A['imsi']}


# --------------------------------------------------------------------------
# Verification codes: get_verification_code and POST /sms/receive
# --------------------------------------------------------------------------

def code_of(app, number, **extra):
    return app.call(CODE, dict(extra, phone_number=number), method='POST', encoding='form')


def yzm(ts):
    return time.strftime('%Y-%m-%dT%H:%M:%S', time.localtime(ts))


def test_operator_code_is_answered_with_earlier_server_time_format(app, ok_run, clock):
    clock.set(float(int(time.time())) + 0.25)
    ok_run('codes', 'add', '13900000001', '604213')
    clock.advance(30)
    body = code_of(app, '13900000001')
    assert (body['code'], body['msg']) == (200, '查询成功')
    assert body['data']['verification_code'] == '604213'
    assert body['data']['yzm_time'] == yzm(clock.t - 30)
    assert re.fullmatch(r'\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d', body['data']['yzm_time'])


@pytest.mark.parametrize('number', ['13900000001', '+8613900000001', '8613900000001', '+86 139 0000 0001',
                                    ' 139 0000 0001 ', '+86-139-0000-0001'])
def test_verification_code_tolerates_country_prefix_and_spaces(app, ok_run, number):
    ok_run('codes', 'add', '13900000001', '604213')
    body = code_of(app, number)
    assert (body['code'], body['data']['verification_code']) == (200, '604213')


def test_no_code_answers_301(app, ok_run):
    body = code_of(app, '13900000001')
    assert (body['code'], body['msg']) == (301, '暂无验证码')
    ok_run('codes', 'add', '13900000002', '604213')
    assert code_of(app, '13900000001')['msg'] == '暂无验证码'


@pytest.mark.parametrize('params,msg', [({}, '缺少参数: phone_number'),
                                        ({'phone_number': ' '}, '缺少参数: phone_number'),
                                        ({'phone_number': 'abc'}, '参数无效: phone_number'),
                                        ({'phone_number': '12'}, '参数无效: phone_number'),
                                        ({'phone_number': '139abc00001'}, '参数无效: phone_number')])
def test_verification_code_bad_phone_number(app, params, msg):
    body = app.call(CODE, params)
    assert (body['code'], body['msg']) == (301, msg)


def test_newest_operator_code_wins(app, ok_run, clock):
    ok_run('codes', 'add', '13900000001', '111111')
    clock.advance(20)
    ok_run('codes', 'add', '13900000001', '222222')
    assert code_of(app, '13900000001')['data']['verification_code'] == '222222'


def test_newest_sms_code_wins(app, clock):
    for code in ('111111', '222222'):
        send(app, SMS, {'from': '106', 'content': '验证码 %s' % code, 'phone_number': '13900000001'}, 'form')
        clock.advance(20)
    assert code_of(app, '13900000001')['data']['verification_code'] == '222222'


def test_code_expires_after_its_lifetime(app, ok_run, clock):
    ok_run('codes', 'add', '13900000001', '604213')
    clock.advance(299)
    assert code_of(app, '13900000001')['data']['verification_code'] == '604213'
    clock.advance(2)
    assert (code_of(app, '13900000001')['code'], code_of(app, '13900000001')['msg']) == (301, '暂无验证码')


def test_code_lifetime_is_settable(app, ok_run, clock):
    ok_run('codes', 'add', '13900000001', '604213')
    ok_run('settings', 'code_lifetime', '0')
    clock.advance(1)
    assert code_of(app, '13900000001')['msg'] == '暂无验证码'
    ok_run('settings', 'code_lifetime', '10')
    clock.advance(500)
    assert code_of(app, '13900000001')['data']['verification_code'] == '604213'


def test_since_narrows_to_codes_received_at_or_after_it(app, ok_run, clock):
    clock.set(float(int(time.time())) + 0.25)
    received = clock.t
    ok_run('codes', 'add', '13900000001', '604213')
    clock.advance(90)
    found = lambda since: code_of(app, '13900000001', since=since)  # noqa: E731
    assert found(str(int(received)))['data']['verification_code'] == '604213'
    assert found(str(int(received) * 1000))['data']['verification_code'] == '604213'
    assert found(time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(received - 60)))['code'] == 200
    assert found(yzm(received - 60))['code'] == 200
    assert found(str(int(received) + 1))['msg'] == '暂无验证码'
    assert found(time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(received + 60)))['msg'] == '暂无验证码'
    body = found('昨天')
    assert (body['code'], body['msg']) == (301, '参数无效: since')


SMS_TEXT = '【小红书】您的验证码是 604213，5分钟内有效，请勿告诉他人。'


@pytest.mark.parametrize('shape', ['flat_form', 'flat_json', 'text_to', 'msg_receiver', 'multipart'])
def test_sms_intake_flat_shapes_feed_verification_code(app, ok_run, shape):
    if shape == 'flat_form':
        body = send(app, SMS, {'from': '1069012345', 'content': SMS_TEXT, 'phone_number': '13900000001'}, 'form')
    elif shape == 'flat_json':
        body = send(app, SMS, {'from': '1069012345', 'content': SMS_TEXT, 'phone_number': 13900000001,
                               'timestamp': int(time.time() * 1000)}, 'json')
    elif shape == 'text_to':
        body = send(app, SMS, {'from': '1069012345', 'text': SMS_TEXT, 'to': '+8613900000001'}, 'json')
    elif shape == 'msg_receiver':
        body = send(app, SMS, {'from': '1069012345', 'msg': SMS_TEXT, 'receiver': '13900000001'}, 'text')
    else:
        body = send(app, SMS, {'from': '1069012345', 'content': SMS_TEXT, 'phone_number': '13900000001'},
                    'multipart')
    assert body['code'] == 200
    answer = code_of(app, '13900000001')
    assert (answer['code'], answer['data']['verification_code']) == (200, '604213')
    [stored] = cli_json(ok_run, 'codes', 'list', '--reveal')
    assert (stored['number'], stored['code'], stored['sms']) == ('13900000001', '604213', SMS_TEXT)


def test_sms_intake_nested_event_with_receiver_in_query(app, ok_run):
    event = {'event': 'sms:received', 'deviceId': 'dev1', 'payload': {
        'message': SMS_TEXT, 'phoneNumber': '+8610690000', 'receivedAt': '2024-12-03T09:15:00.000+08:00',
        'simNumber': 1}}
    res = app.post(SMS + '?phone_number=%2B86%20139%200000%200001', as_json(event), content_type='application/json')
    assert strict_envelope(res)['code'] == 200
    assert code_of(app, '13900000001')['data']['verification_code'] == '604213'
    [stored] = cli_json(ok_run, 'codes', 'list', '--reveal')
    assert (stored['number'], stored['sender'], stored['sms']) == ('13900000001', '+8610690000', SMS_TEXT)


@pytest.mark.parametrize('param', ['phone_number', 'to', 'receiver'])
def test_sms_intake_receiver_in_query_string(app, param):
    res = app.post(SMS + '?%s=13900000001' % param, urllib.parse.urlencode({'from': '106', 'content': SMS_TEXT}),
                   content_type='application/x-www-form-urlencoded')
    assert strict_envelope(res)['code'] == 200
    assert code_of(app, '13900000001')['data']['verification_code'] == '604213'


def test_sms_redelivered_within_a_minute_is_stored_once(app, ok_run, clock):
    params = {'from': '1069012345', 'content': SMS_TEXT, 'phone_number': '13900000001'}
    assert send(app, SMS, params, 'form')['code'] == 200
    clock.advance(30)
    assert send(app, SMS, params, 'json')['code'] == 200
    assert len(cli_json(ok_run, 'codes', 'list', '--reveal')) == 1
    clock.advance(90)
    assert send(app, SMS, params, 'form')['code'] == 200
    assert len(cli_json(ok_run, 'codes', 'list', '--reveal')) == 2


@pytest.mark.parametrize('text,code', [
    ('【小红书】验证码：8842，用于登录。订单号 20241203123456789 请忽略', '8842'),
    ('Your Xiaohongshu code is 604213. Do not share it.', '604213'),
    ('尊敬的用户 13900000001，您的校验码为 7351，有效期5分钟', '7351'),
    ('验证码 12345678', '12345678'),
])
def test_sms_code_extraction(app, text, code):
    send(app, SMS, {'from': '106', 'content': text, 'phone_number': '13900000001'}, 'json')
    assert code_of(app, '13900000001')['data']['verification_code'] == code


def test_sms_without_code_is_stored_but_gives_no_code(app, ok_run):
    body = send(app, SMS, {'from': '10086', 'content': '您的话费余额为 12.5 元', 'phone_number': '13900000001'},
                'form')
    assert body['code'] == 200
    assert code_of(app, '13900000001')['msg'] == '暂无验证码'
    assert len(cli_json(ok_run, 'codes', 'list', '--reveal')) == 1


def test_sms_code_lifetime_counts_from_server_receive_time(app, clock):
    clock.set(float(int(time.time())) + 0.5)
    sent_long_ago = int((clock.t - 3600) * 1000)
    send(app, SMS, {'from': '106', 'content': SMS_TEXT, 'phone_number': '13900000001',
                    'timestamp': sent_long_ago}, 'json')
    clock.advance(60)
    body = code_of(app, '13900000001')
    assert (body['code'], body['data']['yzm_time']) == (200, yzm(clock.t - 60))


@pytest.mark.parametrize('params', [{'from': '106', 'content': SMS_TEXT},
                                    {'from': '106', 'phone_number': '13900000001'},
                                    {'from': '106', 'content': SMS_TEXT, 'phone_number': 'abc'}])
def test_sms_intake_without_receiver_or_text_is_refused(app, ok_run, params):
    body = send(app, SMS, params, 'form')
    assert body['code'] == 301
    assert cli_json(ok_run, 'codes', 'list', '--reveal') == []


# --------------------------------------------------------------------------
# xhs_phone_management/get_xhs_unregistered_information
# --------------------------------------------------------------------------

PROFILE_ROWS = [
    (2, '女', 'https://sns-avatar.example.invalid/p1.jpg', '1999-04-12', '小美的日常', 1),
    (1, '男', 'https://sns-avatar.example.invalid/p2.jpg', '1997-11-02', '阿杰爱做饭', 1),
    (2, '女', 'https://sns-avatar.example.invalid/p3.jpg', '2000-01-30', '周末去哪儿', 1),
    (1, '男', 'https://sns-avatar.example.invalid/p4.jpg', '1995-06-18', '老王钓鱼🎣', 1),
]


def import_profiles(ok_run, tmp_path, count=4):
    path = tmp_path / 'profiles.csv'
    lines = ['gender_id,gender,head_portrait,birthday,name,platform']
    lines += [','.join(str(v) for v in row) for row in PROFILE_ROWS[:count]]
    path.write_text('\n'.join(lines) + '\n', encoding='utf-8')
    ok_run('profiles', 'import', str(path))


def profile_names(body):
    return [item['name'] for item in body['data']['ret_data']]


def test_profile_hand_out_default_one_with_all_fields(app, ok_run, tmp_path):
    import_profiles(ok_run, tmp_path)
    body = app.ok(PROFILES, PHONE_A, method='POST', encoding='form')
    assert body['msg'] == '查询成功'
    assert body['data']['count'] == 4
    [item] = body['data']['ret_data']
    assert type(item['id']) is int
    assert {k: item[k] for k in ('gender_id', 'gender', 'head_portrait', 'birthday', 'name', 'platform')} == {
        'gender_id': 2, 'gender': '女', 'head_portrait': 'https://sns-avatar.example.invalid/p1.jpg',
        'birthday': '1999-04-12', 'name': '小美的日常', 'platform': 1}


def test_profile_hand_out_many_counts_available_before_call(app, ok_run, tmp_path):
    import_profiles(ok_run, tmp_path)
    body = app.ok(PROFILES, dict(PHONE_A, get_info_number='3'))
    assert (body['data']['count'], profile_names(body)) == (4, ['小美的日常', '阿杰爱做饭', '周末去哪儿'])
    assert [item['gender'] for item in body['data']['ret_data']] == ['女', '男', '女']
    body = app.ok(PROFILES, dict(PHONE_B, get_info_number='1'))
    assert (body['data']['count'], profile_names(body)) == (1, ['老王钓鱼🎣'])


def test_two_phones_never_get_the_same_profile(app, ok_run, tmp_path):
    import_profiles(ok_run, tmp_path)
    first = profile_names(app.ok(PROFILES, dict(PHONE_A, get_info_number='2')))
    second = profile_names(app.ok(PROFILES, dict(PHONE_B, get_info_number='2')))
    assert len(set(first) | set(second)) == 4
    body = app.call(PROFILES, dict(PHONE_C, get_info_number='1'))
    assert (body['code'], body['msg']) == (301, '当前未注册小红书账号低于1条, 剩余0条')


def test_profiles_handed_out_without_sim_never_repeat(app, ok_run, tmp_path):
    import_profiles(ok_run, tmp_path, 2)
    first = profile_names(app.ok(PROFILES, {}))
    second = profile_names(app.ok(PROFILES, {'get_info_number': '1'}))
    assert first != second
    assert app.call(PROFILES, {})['msg'] == '当前未注册小红书账号低于1条, 剩余0条'


@pytest.mark.parametrize('asked,available', [(5, 4), (50, 4), (2, 1)])
def test_fewer_profiles_than_asked_reserves_nothing(app, ok_run, tmp_path, asked, available):
    import_profiles(ok_run, tmp_path, available)
    body = app.call(PROFILES, dict(PHONE_A, get_info_number=str(asked)))
    assert (body['code'], body['msg']) == (301, '当前未注册小红书账号低于%d条, 剩余%d条' % (asked, available))
    assert [row['state'] for row in cli_json(ok_run, 'profiles', 'list')] == ['available'] * available


@pytest.mark.parametrize('value', ['0', '51', '-1', '100', 'abc', '2.5', 'null'])
def test_profile_count_out_of_range_is_refused(app, ok_run, tmp_path, value):
    import_profiles(ok_run, tmp_path)
    body = app.call(PROFILES, dict(PHONE_A, get_info_number=value))
    assert (body['code'], body['msg']) == (301, '参数无效: get_info_number')
    assert [row['state'] for row in cli_json(ok_run, 'profiles', 'list')] == ['available'] * 4


def test_update_userinfo_with_profile_name_uses_it_up(app, ok_run, tmp_path):
    import_profiles(ok_run, tmp_path, 2)
    [name] = profile_names(app.ok(PROFILES, PHONE_A))
    assert name == '小美的日常'
    app.ok(USERINFO, dict(ACCOUNT, name=name))
    states = {row['name']: row['state'] for row in cli_json(ok_run, 'profiles', 'list')}
    assert states == {'小美的日常': 'used', '阿杰爱做饭': 'available'}
    body = app.ok(PROFILES, PHONE_B)
    assert (body['data']['count'], profile_names(body)) == (1, ['阿杰爱做饭'])


def test_expired_reservation_returns_profile_to_queue(app, ok_run, tmp_path, clock):
    import_profiles(ok_run, tmp_path, 1)
    assert profile_names(app.ok(PROFILES, PHONE_A)) == ['小美的日常']
    clock.advance(29 * 60)
    assert app.call(PROFILES, PHONE_B)['msg'] == '当前未注册小红书账号低于1条, 剩余0条'
    clock.advance(2 * 60)
    body = app.ok(PROFILES, PHONE_B)
    assert (body['data']['count'], profile_names(body)) == (1, ['小美的日常'])


def test_resent_profile_request_from_same_phone_gets_same_profile(app, ok_run, tmp_path):
    import_profiles(ok_run, tmp_path)
    first = profile_names(app.ok(PROFILES, dict(PHONE_A, get_info_number='2')))
    again = profile_names(app.ok(PROFILES, dict(PHONE_A, get_info_number='2'), method='POST', encoding='json'))
    assert again == first
    assert profile_names(app.ok(PROFILES, dict(PHONE_B, get_info_number='2'))) == ['周末去哪儿', '老王钓鱼🎣']


# --------------------------------------------------------------------------
# §3 Images: DMS_screenshots/save_screenshots, the base64 variants, /media
# --------------------------------------------------------------------------

def wrap76(text, sep='\n'):
    return sep.join(text[i:i + 76] for i in range(0, len(text), 76))


MIME = {'png': 'image/png', 'jpg': 'image/jpeg'}
VARIANTS = {
    'plain': lambda s, ext: s,
    'newline_every_76': lambda s, ext: wrap76(s),
    'crlf_every_76': lambda s, ext: wrap76(s, '\r\n') + '\r\n',
    'data_uri_prefix': lambda s, ext: 'data:%s;base64,%s' % (MIME[ext], s),
    'data_uri_prefix_wrapped': lambda s, ext: 'data:%s;base64,%s' % (MIME[ext], wrap76(s)),
    'urlsafe_alphabet': lambda s, ext: s.replace('+', '-').replace('/', '_'),
    'no_padding': lambda s, ext: s.rstrip('='),
    'urlsafe_no_padding': lambda s, ext: s.replace('+', '-').replace('/', '_').rstrip('='),
    'plus_as_space': lambda s, ext: s.replace('+', ' '),
}


@pytest.mark.parametrize('variant', list(VARIANTS))
@pytest.mark.parametrize('name', ['dm.png', 'dm.jpg'])
def test_every_base64_variant_stores_the_exact_image(app, name, variant):
    text = b64(name)
    assert '+' in text and '/' in text
    ext = name.rsplit('.', 1)[1]
    body = post_json(app, ARTICLE_SHOT, dict(PHONE_A, img_base64_data=VARIANTS[variant](text, ext)))
    assert (body['code'], body['msg']) == (200, '提交成功')
    key = body['data']['key']
    assert key.endswith('.' + ext) and body['data']['keys'] == [key]
    res = app.get(media_path(key))
    assert res.body == sample(name)
    assert res.content_type == MIME[ext]


def test_no_padding_variant_really_drops_padding():
    assert b64('dm.jpg').endswith('=')


def test_unescaped_plus_in_form_body_is_restored(app):
    """Auto.js scripts that build the form by hand send `+` unescaped: it arrives as a space."""
    text = b64('dm.png')
    body = ('imsi=%s&iccid=%s&name=x&img_base64_data=%s' % (PHONE_A['imsi'], PHONE_A['iccid'], text)).encode()
    answer = strict_envelope(app.post(DM_SHOT, body, content_type='application/x-www-form-urlencoded'))
    assert answer['code'] == 200
    assert app.get(media_path(answer['data']['key'])).body == sample('dm.png')


def test_unescaped_plus_in_query_string_is_restored(app):
    data = next(tiny_png(i) for i in range(1000) if '+' in b64s(tiny_png(i)))
    path = ARTICLE_SHOT + '?imsi=%s&iccid=%s&img_base64_data=%s' % (PHONE_A['imsi'], PHONE_A['iccid'], b64s(data))
    answer = strict_envelope(raw(app, path, method='GET'))
    assert answer['code'] == 200
    assert app.get(media_path(answer['data']['key'])).body == data


@pytest.mark.parametrize('encoding', ['form', 'json', 'text', 'multipart', 'json_no_content_type'])
def test_image_accepted_in_every_body_encoding(app, encoding):
    body = send(app, DM_SHOT, dict(PHONE_A, name='路人甲', img_base64_data=b64('note.jpg')), encoding)
    assert body['code'] == 200
    assert app.get(media_path(body['data']['key'])).body == sample('note.jpg')


@pytest.mark.parametrize('value', [
    'hello world', '!!!!notbase64!!!!', 'aGVsbG8gd29ybGQ=', '中文图片', 'A', 'data:image/png;base64,',
    base64.b64encode(b'%PDF-1.4 not an image').decode(), base64.b64encode(b'\x89PNX\r\n').decode(),
    'iVBORw0KGgo*AAAANSUhEUgAAAAEAAAABCAIAAACQd1PeAAAADElEQVR4nGNg',
])
def test_garbage_or_non_image_base64_is_refused(app, value):
    body = post_json(app, ARTICLE_SHOT, dict(PHONE_A, img_base64_data=value))
    assert body['code'] == 301 and 'img_base64_data' in body['msg']
    assert media_files() == []
    assert models.Screenshot.select().count() == 0


@pytest.mark.parametrize('path', [DM_SHOT, ARTICLE_SHOT])
@pytest.mark.parametrize('encoding', ['form', 'json'])
def test_garbage_base64_inside_otherwise_valid_png_is_refused(app, path, encoding):
    text = b64('dm.png')
    broken = text[:1000] + '@#$%' + text[1000:]
    body = send(app, path, dict(PHONE_A, name='x', img_base64_data=broken), encoding)
    assert body['code'] == 301 and 'img_base64_data' in body['msg']
    assert media_files() == []
    assert models.Screenshot.select().count() == 0


def test_hello_world_is_not_an_image_for_dm_screenshots(app):
    body = post_json(app, DM_SHOT, dict(PHONE_A, name='x', img_base64_data=b64s(b'hello world')))
    assert body['code'] == 301 and 'img_base64_data' in body['msg']
    assert media_files() == []


def test_same_image_twice_gives_same_url_and_one_file(app):
    params = dict(PHONE_A, img_base64_data=b64('note.png'))
    first = app.ok(ARTICLE_SHOT, params, method='POST', encoding='form')['data']['key']
    second = app.ok(ARTICLE_SHOT, dict(PHONE_A, img_base64_data=wrap76(b64('note.png'))),
                    method='POST', encoding='json')['data']['key']
    third = app.ok(DM_SHOT, dict(PHONE_B, name='路人乙', img_base64_data=b64('note.png')),
                   method='POST', encoding='form')['data']['key']
    assert first == second == third
    assert len(media_files()) == 1


def test_big_screenshot_twice_is_one_whole_file_and_no_leftovers(app):
    """A screenshot of megabytes is hashed while it is written to a temporary file."""
    image = png_like(os.urandom(3 * 1024 * 1024))
    keys = [app.ok(DM_SHOT, dict(PHONE_A, name='大图', img_base64_data=base64.b64encode(image).decode()),
                   method='POST', encoding=encoding)['data']['key'] for encoding in ('form', 'multipart')]
    assert keys[0] == keys[1]
    assert media_files() == [keys[0].rsplit('/', 1)[1]]
    assert app.get(media_path(keys[0])).body == image
    assert models.Image.get().sha256 == hashlib.sha256(image).hexdigest()


# Sizes around the pieces and the alignment the image files are written in.
@pytest.mark.parametrize('size', [1, 4095, 4096, models.DIRECT_PIECE - 1, models.DIRECT_PIECE,
                                  models.DIRECT_PIECE + 1, 2 * models.DIRECT_PIECE + 4097])
def test_image_files_hold_exactly_the_image_at_every_size(app, size):
    image = png_like(os.urandom(size))
    key = app.ok(DM_SHOT, dict(PHONE_A, name='图', img_base64_data=base64.b64encode(image).decode()),
                 method='POST', encoding='form')['data']['key']
    [name] = media_files()
    with open(os.path.join(models.media_dir(), name), 'rb') as stored:
        assert stored.read() == image
    assert app.get(media_path(key)).body == image


def refuse_direct_writes(monkeypatch):
    """A filesystem that opens O_DIRECT files but refuses the writes (EINVAL)."""
    write = os.write

    def refusing(fd, data):
        if os.O_DIRECT & fcntl.fcntl(fd, fcntl.F_GETFL):
            raise OSError(errno.EINVAL, 'Invalid argument')
        return write(fd, data)
    monkeypatch.setattr(os, 'write', refusing)


@pytest.mark.parametrize('system', ['no O_DIRECT', 'writes refused'])
def test_image_files_are_written_where_direct_writes_are_not_possible(app, monkeypatch, system):
    if system == 'no O_DIRECT':
        monkeypatch.delattr(os, 'O_DIRECT', raising=False)
    else:
        refuse_direct_writes(monkeypatch)
    images = [png_like(os.urandom(size)) for size in (5000, 3 * models.DIRECT_PIECE)]
    for image in images:
        key = app.ok(DM_SHOT, dict(PHONE_A, name='图', img_base64_data=base64.b64encode(image).decode()),
                     method='POST', encoding='form')['data']['key']
        assert app.get(media_path(key)).body == image
    assert len(media_files()) == 2   # no temporary files left behind


@pytest.mark.parametrize('size', [5000, 3 * models.DIRECT_PIECE])
def test_a_full_disk_answers_503_and_stores_nothing(app, size):
    """A file size limit stands in for a full disk (writes fail with EFBIG as with ENOSPC)."""
    image = png_like(os.urandom(size))
    params = dict(PHONE_A, name='图', img_base64_data=base64.b64encode(image).decode())
    app.ok(RELEASE, PHONE_A)   # the phone is registered before the disk fills
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, hard))
    try:
        body = app.call(DM_SHOT, params, method='POST', encoding='form')
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert (body['code'], body['msg']) == (503, '服务器存储空间不足，请稍后重试')
    assert media_files() == [] and models.Image.select().count() == 0
    key = app.ok(DM_SHOT, params, method='POST', encoding='form')['data']['key']
    assert app.get(media_path(key)).body == image


def test_a_database_that_cannot_grow_answers_503_and_loses_no_stored_line(app, db_path):
    """The log line's batch fails at COMMIT, which SQLite rolls back itself."""
    app.ok(LOG, dict(PHONE_A, log_msg='之前'))
    wal = os.path.getsize(db_path + '-wal')
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (wal, hard))
    try:
        body = app.call(LOG, dict(PHONE_A, log_msg='满了'), method='POST', encoding='form')
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert body['code'] == 503 and body['msg'].startswith('服务器存储'), body
    app.ok(LOG, dict(PHONE_A, log_msg='之后'))
    assert [row.msg for row in models.Log.select().order_by(models.Log.id)] == ['之前', '之后']


def test_image_url_uses_the_host_the_phone_used(app):
    res = app.post(ARTICLE_SHOT, urllib.parse.urlencode(dict(PHONE_A, img_base64_data=b64('dm.png'))),
                   content_type='application/x-www-form-urlencoded', headers={'Host': 'xhs.lan:9000'})
    key = strict_envelope(res)['data']['key']
    assert re.fullmatch(r'http://xhs\.lan:9000/media/[^/]+\.png', key), key


def test_image_url_is_absolute_with_fixture_host(app):
    body = app.ok(ARTICLE_SHOT, dict(PHONE_A, img_base64_data=b64('dm.png')), method='POST', encoding='form')
    assert MEDIA_URL_RE.match(body['data']['key'])


@pytest.mark.parametrize('how', ['json_array', 'repeated_form_field', 'repeated_multipart_part'])
def test_article_screenshots_take_several_images(app, how):
    images = [tiny_png(i) for i in range(3)]
    values = [b64s(data) for data in images]
    sim = list(PHONE_A.items())
    if how == 'json_array':
        res = app.post(ARTICLE_SHOT, as_json(dict(PHONE_A, img_base64_data=values)), content_type='application/json')
    elif how == 'repeated_form_field':
        res = app.post(ARTICLE_SHOT, urllib.parse.urlencode(sim + [('img_base64_data', v) for v in values]),
                       content_type='application/x-www-form-urlencoded')
    else:
        res = app.post(ARTICLE_SHOT, params=sim + [('img_base64_data', v) for v in values],
                       content_type='multipart/form-data')
    body = strict_envelope(res)
    assert (body['code'], body['msg']) == (200, '提交成功')
    keys = body['data']['keys']
    assert len(keys) == 3 and body['data']['key'] == keys[0]
    assert [app.get(media_path(key)).body for key in keys] == images
    assert len(media_files()) == 3
    assert [s.kind for s in models.Screenshot.select()] == ['article'] * 3


def test_ten_images_accepted_eleven_refused(app):
    values = [b64s(tiny_png(i)) for i in range(11)]
    body = post_json(app, ARTICLE_SHOT, dict(PHONE_A, img_base64_data=values[:10]))
    assert body['code'] == 200 and len(body['data']['keys']) == 10
    before = media_files()
    body = post_json(app, ARTICLE_SHOT, dict(PHONE_B, img_base64_data=[b64s(tiny_png(i)) for i in range(100, 111)]))
    assert body['code'] == 301 and 'img_base64_data' in body['msg']
    assert media_files() == before


def test_max_images_is_settable(app, ok_run):
    ok_run('settings', 'max_images', '2')
    body = post_json(app, ARTICLE_SHOT, dict(PHONE_A, img_base64_data=[b64s(tiny_png(i)) for i in range(3)]))
    assert body['code'] == 301 and 'img_base64_data' in body['msg']
    assert media_files() == []
    two = [b64s(tiny_png(i)) for i in range(2)]
    assert post_json(app, ARTICLE_SHOT, dict(PHONE_A, img_base64_data=two))['code'] == 200


def test_one_bad_image_among_good_stores_nothing(app):
    values = [b64s(tiny_png(1)), 'aGVsbG8gd29ybGQ=', b64s(tiny_png(2))]
    body = post_json(app, ARTICLE_SHOT, dict(PHONE_A, img_base64_data=values))
    assert body['code'] == 301 and 'img_base64_data' in body['msg']
    assert media_files() == []
    assert models.Screenshot.select().count() == 0


def test_article_screenshots_missing_image_is_named(app):
    body = app.call(ARTICLE_SHOT, PHONE_A, method='POST', encoding='form')
    assert (body['code'], body['msg']) == (301, '缺少参数: img_base64_data')


@pytest.mark.parametrize('path', [DM_SHOT, ARTICLE_SHOT])
def test_image_over_the_limit_answers_413(app, ok_run, path):
    ok_run('settings', 'max_image_mb', '1')
    big = big_png(1024 * 1024 + 50 * 1024)
    body = post_json(app, path, dict(PHONE_A, name='x', img_base64_data=b64s(big)))
    assert body['code'] == 413
    assert media_files() == []
    small = post_json(app, path, dict(PHONE_A, name='x', img_base64_data=b64('note.png')))
    assert small['code'] == 200


def test_image_limit_counts_decoded_bytes_whatever_the_line_breaks(app, ok_run):
    """Exactly max_image_mb decoded is accepted in the 76-column variant; a byte more is not."""
    ok_run('settings', 'max_image_mb', '1')
    for size, code in ((1024 * 1024 + 1, 413), (1024 * 1024, 200)):
        image = png_like(b'\0' * (size - len(png_like(b''))))
        wrapped = base64.encodebytes(image).decode()   # a line break every 76 characters
        body = post_json(app, DM_SHOT, dict(PHONE_A, name='x', img_base64_data=wrapped))
        assert body['code'] == code, (size, body)


def test_body_over_max_body_answers_413_envelope(app, ok_run):
    ok_run('settings', 'max_body_mb', '1')
    big = b64s(big_png(900 * 1024))  # ~1.2 MB of base64, an image within its own limit
    res = app.post(ARTICLE_SHOT, urllib.parse.urlencode(dict(PHONE_A, img_base64_data=big)),
                   content_type='application/x-www-form-urlencoded')
    body = strict_envelope(res)
    assert body['code'] == 413
    assert media_files() == []
    assert phone_rows(ok_run) == {}


def test_body_just_under_max_body_is_accepted(app, ok_run):
    ok_run('settings', 'max_body_mb', '1')
    body = app.call(ARTICLE_SHOT, dict(PHONE_A, img_base64_data=b64('note.png')), method='POST', encoding='json')
    assert body['code'] == 200


@pytest.mark.parametrize('name', ['dm.png', 'dm.jpg', 'note.png'])
def test_media_serves_exact_bytes(app, name):
    body = app.ok(DM_SHOT, dict(PHONE_A, name='x', img_base64_data=b64(name)), method='POST', encoding='form')
    res = app.get(media_path(body['data']['key']))
    assert res.status_int == 200
    assert res.body == sample(name)
    assert res.content_type == MIME[name.rsplit('.', 1)[1]]


@pytest.fixture
def stored_name(app, tmp_path):
    """A stored image's file name, plus bait files the server must never serve."""
    body = app.ok(DM_SHOT, dict(PHONE_A, name='x', img_base64_data=b64('dm.png')), method='POST', encoding='form')
    (tmp_path / 'secret.txt').write_text('secret')
    with open(os.path.join(models.media_dir(), 'readme.txt'), 'w') as handle:
        handle.write('not an image')
    return media_path(body['data']['key'])[len('/media/'):]


@pytest.mark.parametrize('path', [
    '/media/..%2Fsecret.txt', '/media/..%2Fxhs.db', '/media/..%2F..%2F..%2Fetc%2Fpasswd',
    '/media/%2e%2e/secret.txt', '/media/%2e%2e%2fxhs.db', '/media/../secret.txt', '/media/..',
    '/media/%2Fetc%2Fpasswd', '/media//etc/passwd', '/media/{tmp}/secret.txt', '/media/{tmp}/xhs.db',
    '/media/readme.txt', '/media/{upper}', '/media/{name}.tmp', '/media/x/../{name}', '/media/./{name}',
    '/media/0123456789abcdef0123456789abcdef.png', '/media/{name}%00', '/media/%00',
])
def test_media_names_outside_the_stored_pattern_are_404(app, stored_name, tmp_path, path):
    target = path.format(tmp=str(tmp_path).lstrip('/'), name=stored_name, upper=stored_name.upper())
    res = app.get(target, expect_errors=True)
    assert res.status_int == 404
    assert b'secret' not in res.body and b'SQLite' not in res.body and b'not an image' not in res.body


# --------------------------------------------------------------------------
# §4 Access: token, allowed addresses, approval mode
# --------------------------------------------------------------------------

def test_token_required_when_set(app, ok_run):
    xhs_server.configure(token='s3cret')
    body = app.call(LOG, dict(PHONE_A, log_msg='无令牌'), method='POST', encoding='form')
    assert (body['code'], body['msg']) == (401, '未授权')
    body = app.call(LOG, dict(PHONE_A, log_msg='错令牌', token='wrong'), method='POST', encoding='form')
    assert body['code'] == 401
    assert log_msgs(ok_run) == []
    assert phone_rows(ok_run) == {}


@pytest.mark.parametrize('how', ['query_param', 'form_param', 'json_param', 'x_token', 'bearer', 'bearer_lower'])
def test_token_accepted_as_parameter_or_header(app, ok_run, how):
    xhs_server.configure(token='s3cret')
    params = dict(PHONE_A, log_msg='有令牌')
    headers = {}
    if how == 'x_token':
        headers['X-Token'] = 's3cret'
    elif how == 'bearer':
        headers['Authorization'] = 'Bearer s3cret'
    elif how == 'bearer_lower':
        headers['Authorization'] = 'bearer s3cret'
    else:
        params['token'] = 's3cret'
    encoding = {'query_param': 'query', 'form_param': 'form', 'json_param': 'json'}.get(how, 'form')
    if headers:
        res = app.post(LOG, urllib.parse.urlencode(params), content_type='application/x-www-form-urlencoded',
                       headers=headers)
        body = strict_envelope(res)
    else:
        body = send(app, LOG, params, encoding)
    assert (body['code'], body['msg']) == (200, '日志纪录成功')
    assert log_msgs(ok_run) == ['有令牌']


def test_healthz_needs_no_token(app):
    xhs_server.configure(token='s3cret')
    body = strict_envelope(app.get('/healthz'))
    assert (body['code'], body['msg'], body['data']['db']) == (200, 'ok', 'ok')


def test_healthz_reports_version_and_db(app):
    body = strict_envelope(app.get('/healthz'))
    assert (body['code'], body['msg'], body['note']) == (200, 'ok', {})
    assert body['data']['db'] == 'ok'
    assert isinstance(body['data']['version'], str) and body['data']['version']


def test_media_needs_token_when_set(app):
    key = app.ok(DM_SHOT, dict(PHONE_A, name='x', img_base64_data=b64('dm.png')), method='POST',
                 encoding='form')['data']['key']
    xhs_server.configure(token='s3cret')
    body = strict_envelope(app.get(media_path(key)))
    assert body['code'] == 401
    assert app.get(media_path(key) + '?token=s3cret').body == sample('dm.png')
    assert app.get(media_path(key), headers={'X-Token': 's3cret'}).body == sample('dm.png')
    assert app.get(media_path(key), headers={'Authorization': 'Bearer s3cret'}).body == sample('dm.png')


def test_sms_intake_needs_token_when_set(app, ok_run):
    xhs_server.configure(token='s3cret')
    params = {'from': '106', 'content': SMS_TEXT, 'phone_number': '13900000001'}
    assert send(app, SMS, params, 'form')['code'] == 401
    assert cli_json(ok_run, 'codes', 'list', '--reveal') == []
    assert send(app, SMS + '?token=s3cret', params, 'form')['code'] == 200
    assert app.call(CODE, {'phone_number': '13900000001', 'token': 's3cret'})['data']['verification_code'] == '604213'


def test_disallowed_address_is_refused(app, ok_run):
    xhs_server.configure(allow=['10.9.0.0/16'])
    body = app.call(LOG, dict(PHONE_A, log_msg='外人'), method='POST', encoding='form')
    assert (body['code'], body['msg']) == (403, '禁止访问')
    assert log_msgs(ok_run) == []
    res = app.post(LOG, urllib.parse.urlencode(dict(PHONE_A, log_msg='内网')),
                   content_type='application/x-www-form-urlencoded', extra_environ={'REMOTE_ADDR': '10.9.3.4'})
    assert strict_envelope(res)['code'] == 200
    assert log_msgs(ok_run) == ['内网']


def test_disallowed_address_is_refused_media_and_sms(app):
    key = app.ok(DM_SHOT, dict(PHONE_A, name='x', img_base64_data=b64('dm.png')), method='POST',
                 encoding='form')['data']['key']
    xhs_server.configure(allow=['10.9.0.0/16'])
    assert strict_envelope(app.get(media_path(key)))['code'] == 403
    assert send(app, SMS, {'from': '1', 'content': SMS_TEXT, 'phone_number': '13900000001'}, 'form')['code'] == 403


@pytest.mark.parametrize('address,allowed', [
    ('127.0.0.1', True), ('10.1.2.3', True), ('172.16.5.4', True), ('172.31.255.1', True),
    ('192.168.0.9', True), ('169.254.1.1', True), ('100.64.0.5', True), ('::1', True),
    ('fd00::1', True), ('fe80::1', True), ('::ffff:192.168.1.5', True),
    ('8.8.8.8', False), ('172.32.0.1', False), ('100.128.0.1', False), ('2001:db8::1', False),
])
def test_default_allowed_callers_are_loopback_and_lan(app, address, allowed):
    res = app.post(IS_UPDATE, urllib.parse.urlencode(PHONE_A), content_type='application/x-www-form-urlencoded',
                   extra_environ={'REMOTE_ADDR': address})
    assert strict_envelope(res)['code'] == (200 if allowed else 403)


def test_approval_mode_refuses_new_phone_until_approved(app, ok_run):
    xhs_server.configure(approve_new=True)
    body = app.call(IS_UPDATE, PHONE_A)
    assert body['code'] == 403 and body['msg'].startswith('禁止访问')
    assert app.call(RELEASE, PHONE_A)['code'] == 403
    phone = phone_rows(ok_run)[PHONE_A['imsi']]
    assert phone['approved'] is False
    ok_run('phones', 'set', PHONE_A['imsi'], '--approve')
    assert app.call(IS_UPDATE, PHONE_A)['code'] == 200


def test_approval_mode_keeps_unapproved_phones_log_lines(app, ok_run):
    xhs_server.configure(approve_new=True)
    body = app.call(LOG, dict(PHONE_A, log_msg='待批准的手机 🙂'), method='POST', encoding='form')
    assert body['code'] == 403
    assert log_msgs(ok_run) == ['待批准的手机 🙂']
    assert phone_rows(ok_run)[PHONE_A['imsi']]['approved'] is False


def test_approval_mode_lets_operator_registered_phone_in(app, ok_run):
    register(ok_run, PHONE_A, 'A-01')
    xhs_server.configure(approve_new=True)
    assert app.call(IS_UPDATE, PHONE_A)['code'] == 200
    assert app.call(IS_UPDATE, PHONE_B)['code'] == 403


def test_approval_mode_does_not_hand_tasks_to_unapproved_phone(app, ok_run):
    xhs_server.configure(approve_new=True)
    task = add_release(ok_run, '笔记')
    assert app.call(RELEASE, PHONE_A)['code'] == 403
    assert task_rows(ok_run)[task]['status'] == 'pending'


@pytest.mark.parametrize('text', [
    '长日志🙂 ' * 800,                       # thousands of escapes, all valid
    '100% 完成 %zz =x= ' * 400,              # invalid escapes and literal '=' in a big value
    '=\n%0A ' * 1000,                        # what quoted-printable would read as soft breaks
])
def test_big_form_values_decode_exactly(app, ok_run, text):
    # '%' and '=' go unescaped, as a sloppy client sends them; the reference is urllib.
    body = ('log_msg=' + urllib.parse.quote(text, safe='=%') + '&imsi=%s&iccid=%s' % (
        PHONE_A['imsi'], PHONE_A['iccid'])).encode()
    assert len(body) > 4096
    res = app.post('/xhs_phone_log/add', body, content_type='application/x-www-form-urlencoded')
    assert json.loads(res.body)['code'] == 200
    stored = json.loads(ok_run('logs', '--json').stdout)[-1]['msg']
    assert stored == urllib.parse.unquote_plus(body.split(b'&')[0][8:].decode()).strip()
