"""Garbage in, envelope out: random requests at every endpoint never break the contract."""
import base64
import json
import sqlite3

import pytest
from hypothesis import HealthCheck, assume, given, settings, strategies as st

import models
import xhs_server
from conftest import png_like

DOCUMENTED = {200, 301, 401, 402, 403, 413, 503}
PATHS = sorted('/%s/%s' % key for key in xhs_server.HANDLERS) + [
    '/sms/receive', '/healthz', '/', '/xhs_phone_log', '/no/such/thing', '/media/x.png']
NAMES = ['imsi', 'iccid', 'macaddr', 'phone_type', 'log_msg', 'task_id', 'url', 'name', 'img_base64_data',
         'phone_number', 'since', 'get_info_number', 'comment_id', 'notes_url', 'screenshots',
         'comments_content', 'nick_name', 'head_portrait', 'comments_status', 'article_picture_address',
         'screenshots_address', 'article_notes_id', 'task_type', 'xiaohongshu_id', 'home_url',
         'platform', 'phone_num', 'comment_completion_time', 'content', 'from', 'payload', 'token']
GOOD = {'imsi': '460011234567801', 'iccid': '89860112345678901201', 'phone_type': '2',
        'task_id': '1', 'comment_id': '1', 'phone_number': '13900000001', 'log_msg': '日志',
        'img_base64_data': base64.b64encode(png_like(b'\0' * 40)).decode()}

texts = st.one_of(
    st.text(max_size=40),
    st.sampled_from(['null', 'undefined', '0000000', '02:00:00:00:00:00', '-1', '1e400', 'NaN',
                     '9' * 30, '🙂' * 10, 'https://www.xiaohongshu.com/explore/6751c0de000000000b00aa01',
                     'data:image/png;base64,iVBORw0KGgo=', '%FF%FE', '{"a": 1}', '[1, 2]', ' ', '']),
    st.integers(-2 ** 70, 2 ** 70).map(str),
)
values = st.one_of(texts, st.integers(-2 ** 64, 2 ** 64), st.floats(), st.booleans(), st.none(),
                   st.lists(texts, max_size=3), st.dictionaries(st.sampled_from(NAMES), texts, max_size=3))
params = st.dictionaries(st.one_of(st.sampled_from(NAMES), st.text(max_size=8)), values, max_size=8)


def form_bytes(data):
    return '&'.join('%s=%s' % (k, v) for k, v in data.items()).encode('utf-8', 'surrogatepass')


def multipart(data, boundary='fuzzb0undary'):
    parts = [b'--%s\r\nContent-Disposition: form-data; name="%s"\r\n\r\n%s\r\n'
             % (boundary.encode(), str(k).encode('utf-8', 'replace'), json.dumps(v).encode())
             for k, v in data.items()]
    return b''.join(parts) + b'--%s--\r\n' % boundary.encode(), 'multipart/form-data; boundary=' + boundary


@st.composite
def requests(draw):
    path = draw(st.sampled_from(PATHS))
    path = draw(st.sampled_from(['', '/api_hurong'])) + path + draw(st.sampled_from(['', '/0', '/', '/0/', '/x']))
    data = dict(draw(st.sampled_from([{}, GOOD])), **draw(params))
    kind = draw(st.sampled_from(['query', 'form', 'json', 'text', 'double', 'multipart', 'bytes',
                                 'broken-json', 'broken-multipart', 'bad-utf8']))
    query, body, ctype = '', b'', None
    if kind == 'query':
        query = form_bytes({k: v for k, v in data.items()}).decode('utf-8', 'replace')
    elif kind == 'form':
        body, ctype = form_bytes(data), 'application/x-www-form-urlencoded'
    elif kind in ('json', 'text'):
        body = json.dumps(data).encode()
        ctype = 'application/json' if kind == 'json' else draw(st.sampled_from(['text/plain', None]))
    elif kind == 'double':
        body, ctype = json.dumps(json.dumps(data)).encode(), 'text/plain'
    elif kind == 'multipart':
        body, ctype = multipart(data)
    elif kind == 'broken-json':
        body, ctype = json.dumps(data).encode()[:draw(st.integers(0, 30))], 'application/json'
    elif kind == 'broken-multipart':
        body, ctype = multipart(data)
        body = body[:draw(st.integers(0, len(body)))]
        ctype = draw(st.sampled_from([ctype, 'multipart/form-data', 'multipart/form-data; boundary=']))
    elif kind == 'bad-utf8':
        body, ctype = b'log_msg=\xff\xfe%FF' + form_bytes(data), 'application/x-www-form-urlencoded'
        query = 'imsi=%ff%fe&iccid=' + draw(st.sampled_from(['%C0', '%E4%B8', '']))
    else:
        body = draw(st.binary(max_size=300))
        ctype = draw(st.sampled_from([None, 'application/octet-stream', 'application/json',
                                      'application/x-www-form-urlencoded', 'multipart/form-data; boundary=x']))
    method = draw(st.sampled_from(['GET', 'POST', 'POST', 'PUT', 'DELETE']))
    return method, path, query, body, ctype


@pytest.fixture(scope='module')
def fuzz_app(tmp_path_factory):
    from webtest import TestApp
    path = str(tmp_path_factory.mktemp('fuzz') / 'fuzz.db')
    models.init_db(path)
    xhs_server.configure()
    models.Task.create(kind=models.RELEASE, content='可领取的笔记')
    yield TestApp(xhs_server.app, extra_environ={'REMOTE_ADDR': '10.0.0.7', 'HTTP_HOST': 'fuzz:8000'}), path
    models.db.close()


@settings(max_examples=2500, deadline=None, suppress_health_check=list(HealthCheck))
@given(requests())
def test_any_request_gets_a_documented_envelope(fuzz_app, request_):
    app, _ = fuzz_app
    method, path, query, body, ctype = request_
    headers = {'Content-Type': ctype} if ctype else {}
    res = app.request(path + ('?' + query if query else ''), method=method, body=body,
                      headers=headers, expect_errors=True)
    if path.startswith('/media/') and res.status_int == 404:
        assert res.content_type == 'application/json'
        return
    assert res.status_int == 200, (res.status, res.body[:200])
    assert res.headers['Content-Type'] == 'application/json; charset=utf-8'
    answer = json.loads(res.body.decode('utf-8'))
    assert set(answer) == {'code', 'msg', 'data', 'note'}
    assert answer['code'] in DOCUMENTED, answer


def test_database_is_consistent_after_the_fuzzing(fuzz_app):
    _, path = fuzz_app
    check = sqlite3.connect(path)
    try:
        assert check.execute('PRAGMA integrity_check').fetchone()[0] == 'ok'
        assert check.execute('PRAGMA foreign_key_check').fetchall() == []
        states = {row[0] for row in check.execute('SELECT DISTINCT status FROM task')}
        assert states <= set(models.TASK_STATES)
        claimed = check.execute("SELECT COUNT(*) FROM task WHERE status = 'claimed' "
                                'AND claimed_by_id IS NULL').fetchone()[0]
        assert claimed == 0
        bad_phones = check.execute("SELECT COUNT(*) FROM phone WHERE imsi IN ('null', 'undefined') "
                                   "OR iccid IN ('null', 'undefined')").fetchone()[0]
        assert bad_phones == 0
    finally:
        check.close()


# Form values are percent-decoded by a fast path (binascii's quoted-printable
# decoder, each piece into text); it must read every text exactly as a form decoder
# does, bad escapes and UTF-8 cut between pieces included.
escapes = st.lists(st.one_of(
    st.sampled_from(['%2B', '%2f', '%3D', '%25', '%E4%B8%AD', '%E4', '%B8', '%FF', '%F0%9F%99',
                     '%', '%%', '%=', '%2', '%G1', '%2%41', '%\n', '%\r', '=', '==', '=3D', '=\r\n',
                     '\n', '\r', '+', 'A', 'z', '9', '中']),
    st.text(alphabet='AZaz09+/%=', max_size=6)), min_size=1, max_size=40)


@settings(max_examples=1000, deadline=None, suppress_health_check=list(HealthCheck))
@given(escapes, st.integers(0, 8), st.sampled_from([3, 4, 5, 7, 64, xhs_server.DECODE_PIECE]),
       st.sampled_from([None, 1, 2, 3, 5, 64, xhs_server.FORM_PIECE]))
def test_form_value_decodes_like_a_form_decoder(fuzz_app, monkeypatch, pieces, where, piece, arrival):
    """Also with the decoder's pieces a few bytes long, so escapes meet their edges, and
    with the body parsed as it arrives (`arrival`: bytes read at a time) or read whole."""
    import urllib.parse
    app, _ = fuzz_app
    monkeypatch.setattr(xhs_server, 'DECODE_PIECE', piece)
    monkeypatch.setattr(xhs_server, 'SLOW_BODY', 1 << 40 if arrival is None else 0)
    monkeypatch.setattr(xhs_server, 'FORM_PIECE', arrival or xhs_server.FORM_PIECE)
    filler = 'QUJD%2B%2F' * 500  # megabytes of base64 look like this
    text = ''.join(pieces)
    value = [text, text + filler, filler + text, filler + text + filler, text * 200 + filler,
             filler + '%3D', filler + '%3d=', filler + text + '%3D%3D', filler + '%3D' + text][where]
    expected = urllib.parse.unquote_plus(value, errors='replace').strip()  # values are stripped
    assume(expected)   # an empty log_msg is refused, rightly
    body = ('imsi=%s&iccid=%s&log_msg=' % (GOOD['imsi'], GOOD['iccid'])).encode() + value.encode()
    res = app.post('/xhs_phone_log/add', body, content_type='application/x-www-form-urlencoded')
    assert json.loads(res.body)['code'] == 200
    stored = models.db.execute_sql('SELECT msg FROM log ORDER BY id DESC LIMIT 1').fetchone()[0]
    assert stored == expected
