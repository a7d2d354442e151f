"""Comment moderation (API.md §2, group DMS_screenshots): the phones' HTTP calls and the
operator's `comments` commands, checked through both interfaces."""
import base64
import datetime
import json
import re
import time
import urllib.parse
from types import SimpleNamespace

import pytest

from conftest import PHONE_A, PHONE_B, b64

HOST = 'http://192.168.1.10:8000'
NOTE_HEX = '65a1b2c3d4e5f60718293a4b'
NOTE_URL = 'https://www.xiaohongshu.com/explore/%s?xsec_token=AB12cd&xsec_source=pc_user' % NOTE_HEX
ARTICLE = HOST + '/media/a1b2c3d4e5f60718293a4b5c6d7e8f90.png'
OTHER_ARTICLE = HOST + '/media/0f9e8d7c6b5a49382716f5e4d3c2b1a0.png'
SHOT = HOST + '/media/%032x.png'
REPLY_TEXT = '谢谢喜欢～ 链接在主页🔗'
UNKNOWN_ID = 987654
PLACEHOLDERS = ['null', 'undefined', 'unknown', 'none', '000000000000000']
DATETIME_RE = re.compile(r'^\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}$')

ACCOUNT_A = {'name': '小美的日常', 'xiaohongshu_id': '95012345678', 'phone_num': '13900001111'}
ACCOUNT_B = {'name': '阿杰的好物', 'xiaohongshu_id': '95087654321', 'phone_num': '13900002222'}


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------

def dms(op):
    return '/DMS_screenshots/' + op


def comment(n=1, **overrides):
    """The fields a phone reports for its n-th comment."""
    fields = {'head_portrait': 'https://sns-avatar-qc.xhscdn.com/avatar/%d.jpg' % n,
              'nick_name': '路人%d' % n, 'comments_status': '1',
              'comments_content': '第%d条：好看😍求链接' % n,
              'article_picture_address': ARTICLE, 'screenshots_address': SHOT % n}
    fields.update(overrides)
    return fields


def report(app, phone=PHONE_A, n=1, encoding='form', **overrides):
    """A phone reports a new comment; returns its id."""
    body = app.ok(dms('add_comment'), dict(phone, **comment(n, **overrides)), method='POST',
                  encoding=encoding)
    assert body['msg'] == '创建成功', body
    assert type(body['data']['id']) is int
    return body['data']['id']


def post(app, op, params, **kwargs):
    return app.call(dms(op), params, method='POST', encoding='form', **kwargs)


def listed(ok_run, *args):
    return json.loads(ok_run('comments', 'list', '--json', *args).stdout)


def reply_tasks(ok_run):
    return json.loads(ok_run('tasks', 'list', '--kind', 'comment_reply', '--json').stdout)


def snapshot(ok_run):
    """Everything the comment operations can change, as the operator sees it."""
    return listed(ok_run), json.loads(ok_run('tasks', 'list', '--json').stdout)


def order_reply(ok_run, comment_id, text=REPLY_TEXT):
    out = ok_run('comments', 'reply', comment_id, text).stdout
    match = re.fullmatch(r'reply task (\d+) queued for comment %d\n' % comment_id, out)
    assert match, out
    return int(match.group(1))


def order_delete(ok_run, comment_id):
    assert ok_run('comments', 'delete', comment_id).stdout == 'comment %d ordered deleted\n' % comment_id


def poll_reply(app, phone):
    return app.ok(dms('query_reply_task'), phone)


def poll_delete(app, phone):
    return app.ok(dms('query_delete_task'), phone)


def assert_no_task(body):
    assert (body['code'], body['msg'], body['data']) == (200, '无任务', {})


def complete_reply(app, task_id, **extra):
    body = post(app, 'reply_comment_is_success', dict(comment_id=task_id, **extra))
    assert (body['code'], body['msg']) == (200, '成功'), body


def report_deleted(app, comment_id):
    body = post(app, 'reply_comment_is_delete', {'comment_id': comment_id})
    assert (body['code'], body['msg']) == (200, '操作完成'), body


def report_failed(app, comment_id):
    body = post(app, 'comment_post_exception_instead', {'comment_id': comment_id})
    assert (body['code'], body['msg']) == (200, '删除异常成功'), body


def add_phone(ok_run, phone, label):
    ok_run('phones', 'add', '--imsi', phone['imsi'], '--iccid', phone['iccid'], '--label', label)


def bind_account(app, phone, account):
    app.ok('/xiaohongshu_userprofile/update_userinfo',
           dict(phone, home_url='https://www.xiaohongshu.com/user/profile/' + account['xiaohongshu_id'],
                macaddr='AC:3C:0B:12:34:56', platform=1, **account), method='POST', encoding='form')


def publish_note(app, ok_run, url=NOTE_URL, phone=PHONE_A):
    """The operator queues a note, the phone takes it and reports its URL; returns the note id."""
    out = ok_run('tasks', 'add-release', '--content', '秋日穿搭分享🍂 %s' % url).stdout
    task_id = int(re.fullmatch(r'release task (\d+) queued\n', out).group(1))
    assert app.ok('/xiaohongshu_biji/get_release_task', phone)['data']['id'] == task_id
    body = app.ok('/xiaohongshu_biji/upload_url', {'task_id': task_id, 'url': url},
                  method='POST', encoding='form')
    assert body['msg'] == '提交成功'
    return task_id


def upload_article(app, phone=PHONE_A, image='note.png'):
    body = app.ok(dms('save_screenshots'), dict(phone, img_base64_data=b64(image)),
                  method='POST', encoding='form')
    assert body['msg'] == '提交成功'
    return body['data']['key']


def link(app, notes_url, screenshots):
    return post(app, 'associate_notes', {'notes_url': notes_url, 'screenshots': screenshots})


def correlation(app, screenshots):
    body = app.ok(dms('determine_correlation'), {'screenshots': screenshots})
    assert body['msg'] == '查询完成'
    return body['data']


def local_iso(*fields):
    return datetime.datetime(*fields).astimezone().isoformat(timespec='seconds')


def assert_fails_in_one_line(result, message):
    assert result.exit_code not in (0, None), result.output
    assert result.stdout == ''
    assert result.stderr.splitlines() == ['Error: ' + message], result.stderr


def row(comment_id, phone, n=None, *, fields=None, note=None, reply=None, reply_text=None,
        replies=0, delete='none'):
    """The `comments list --json` row expected for a comment (without created_at)."""
    fields = fields or comment(n)
    return {'id': comment_id, 'phone': phone, 'nick_name': fields['nick_name'],
            'content': fields['comments_content'], 'note_id': note,
            'screenshot': fields['screenshots_address'], 'article': fields['article_picture_address'],
            'reply': reply, 'reply_text': reply_text, 'replies': replies, 'delete': delete}


def without_time(rows):
    return [{key: value for key, value in item.items() if key != 'created_at'} for item in rows]


@pytest.fixture
def world(app, ok_run):
    """Phone A with a published note linked to ARTICLE, and one comment on it that the
    operator has answered and ordered deleted."""
    note = publish_note(app, ok_run)
    assert link(app, NOTE_URL, ARTICLE)['data'] == {'biji_id': note}
    comment_id = report(app)
    reply = order_reply(ok_run, comment_id)
    order_delete(ok_run, comment_id)
    return SimpleNamespace(note=note, comment=comment_id, reply=reply)


# --------------------------------------------------------------------------
# add_comment
# --------------------------------------------------------------------------

def test_add_comment_records_the_comment_for_the_reporting_phone(app, ok_run):
    add_phone(ok_run, PHONE_A, 'A-01')
    comment_id = report(app, n=1)
    rows = listed(ok_run)
    assert without_time(rows) == [row(comment_id, 'A-01', 1)]
    assert re.fullmatch(r'\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d\d:\d\d', rows[0]['created_at'])


EMOJI_COMMENT = {'nick_name': '🍠薯条小姐姐 ✨', 'comments_status': '评论',
                 'comments_content': '太好看了吧😍👍🏻！求同款链接～ #秋冬穿搭 "引号" & 100%',
                 'head_portrait': 'https://sns-avatar-qc.xhscdn.com/avatar/头像.jpg?x=1&y=2'}


@pytest.mark.parametrize('encoding', ['form', 'json', 'text', 'multipart', 'query'])
def test_add_comment_round_trips_chinese_and_emoji_exactly(app, ok_run, encoding):
    add_phone(ok_run, PHONE_A, 'A-01')
    method = 'GET' if encoding == 'query' else 'POST'
    body = app.ok(dms('add_comment'), dict(PHONE_A, **comment(1, **EMOJI_COMMENT)),
                  method=method, encoding=encoding)
    comment_id = body['data']['id']
    assert without_time(listed(ok_run)) == [row(comment_id, 'A-01', fields=comment(1, **EMOJI_COMMENT))]
    order_reply(ok_run, comment_id, '谢谢宝～ 🎀')
    task = poll_reply(app, PHONE_A)['data']
    assert (task['nick_name'], task['comments_content'], task['comment_response']) == (
        EMOJI_COMMENT['nick_name'], EMOJI_COMMENT['comments_content'], '谢谢宝～ 🎀')
    order_delete(ok_run, comment_id)
    gone = poll_delete(app, PHONE_A)['data']
    assert (gone['user_name'], gone['comments_content']) == (
        EMOJI_COMMENT['nick_name'], EMOJI_COMMENT['comments_content'])


def test_re_reported_comment_is_not_duplicated(app, ok_run):
    first = report(app, n=1)
    again = comment(1, nick_name='  路人1 ', comments_content='第1条：好看😍求链接\n',
                    screenshots_address=SHOT % 99)
    for _ in range(2):
        body = post(app, 'add_comment', dict(PHONE_A, **again))
        assert (body['code'], body['msg'], body['data']) == (200, '重复评论', {'id': first})
    assert without_time(listed(ok_run)) == [row(first, PHONE_A['imsi'], 1)]


def test_same_words_from_another_phone_or_commenter_are_separate_comments(app, ok_run):
    ids = [report(app, PHONE_A, 1), report(app, PHONE_B, 1), report(app, PHONE_A, 1, nick_name='路人2')]
    assert len(set(ids)) == 3
    assert [r['id'] for r in listed(ok_run)] == ids


def test_add_comment_with_article_notes_id_ties_it_to_that_note(app, ok_run):
    note = publish_note(app, ok_run)
    comment_id = report(app, article_notes_id=note, article_picture_address=OTHER_ARTICLE)
    assert without_time(listed(ok_run)) == [
        row(comment_id, PHONE_A['imsi'], fields=comment(1, article_picture_address=OTHER_ARTICLE), note=note)]


def test_add_comment_takes_article_notes_id_as_json_number(app, ok_run):
    note = publish_note(app, ok_run)
    report(app, encoding='json', article_notes_id=note)
    assert listed(ok_run)[0]['note_id'] == note


# --------------------------------------------------------------------------
# Parameters: missing, invalid, unknown ids (every operation)
# --------------------------------------------------------------------------

def full_params(op, s):
    """A complete, valid request for each operation against `world`."""
    return {
        'add_comment': dict(PHONE_A, **comment(7)),
        'save_screenshots': dict(PHONE_A, img_base64_data=b64('dm.png')),
        'query_reply_task': dict(PHONE_A),
        'query_delete_task': dict(PHONE_A),
        'reply_comment_is_success': {'comment_id': s.reply},
        'reply_comment_is_delete': {'comment_id': s.comment},
        'comment_post_exception_instead': {'comment_id': s.comment},
        'associate_notes': {'notes_url': NOTE_URL, 'screenshots': OTHER_ARTICLE},
        'determine_correlation': {'screenshots': ARTICLE},
    }[op]


REQUIRED = [('add_comment', name) for name in ('imsi', 'iccid') + tuple(comment())] + [
    ('save_screenshots', 'imsi'), ('save_screenshots', 'iccid'), ('save_screenshots', 'img_base64_data'),
    ('query_reply_task', 'imsi'), ('query_reply_task', 'iccid'),
    ('query_delete_task', 'imsi'), ('query_delete_task', 'iccid'),
    ('reply_comment_is_success', 'comment_id'),
    ('reply_comment_is_delete', 'comment_id'),
    ('comment_post_exception_instead', 'comment_id'),
    ('associate_notes', 'notes_url'), ('associate_notes', 'screenshots'),
    ('determine_correlation', 'screenshots'),
]


# A blank value counts as missing: tried on each operation's first required parameter.
MISSING = [(op, name, None) for op, name in REQUIRED] + [
    (op, name, ' \t ') for op, name in dict(reversed(REQUIRED)).items()]


@pytest.mark.parametrize('op, name, blank', MISSING)
def test_missing_parameter_is_refused_by_name_and_changes_nothing(app, ok_run, world, op, name, blank):
    params = full_params(op, world)
    params.pop(name)
    if blank is not None:
        params[name] = blank
    before = snapshot(ok_run)
    body = post(app, op, params)
    assert (body['code'], body['msg'], body['data']) == (301, '缺少参数: %s' % name, {})
    assert snapshot(ok_run) == before
    assert correlation(app, OTHER_ARTICLE) == {'flag': False, 'biji_id': None}


BAD_IDS = ['abc', '1.5', '-3', '12a', '0x1f', '一']
BAD_SIMS = PLACEHOLDERS + ['4600-1234', '1234']
# Each bad value tried once, spread over the operations that take the parameter.
INVALID = [(op, 'comment_id', BAD_IDS[i * 2 + j]) for i, op in enumerate(
    ('reply_comment_is_success', 'reply_comment_is_delete', 'comment_post_exception_instead'))
    for j in range(2)] + [
    (op, field, BAD_SIMS[(i * 2 + j) % len(BAD_SIMS)])
    for i, op in enumerate(('add_comment', 'save_screenshots', 'query_reply_task', 'query_delete_task'))
    for j, field in enumerate(('imsi', 'iccid'))] + [
    ('add_comment', 'article_notes_id', 'abc'),
    ('add_comment', 'article_notes_id', '3.5'),
    ('reply_comment_is_success', 'comment_completion_time', 'yesterday'),
    ('reply_comment_is_success', 'comment_completion_time', '2026-13-45 99:00:00'),
    ('save_screenshots', 'img_base64_data', 'this is not base64!'),
]


@pytest.mark.parametrize('op, name, value', INVALID)
def test_invalid_value_is_refused_by_name_and_changes_nothing(app, ok_run, world, op, name, value):
    params = dict(full_params(op, world), **{name: value})
    before = snapshot(ok_run)
    body = post(app, op, params)
    assert (body['code'], body['msg'], body['data']) == (301, '参数无效: %s' % name, {})
    assert snapshot(ok_run) == before


def test_invalid_completion_time_leaves_reply_task_with_the_phone(app, ok_run, world):
    assert poll_reply(app, PHONE_A)['data']['id'] == world.reply
    body = post(app, 'reply_comment_is_success', {'comment_id': world.reply,
                                                  'comment_completion_time': 'yesterday'})
    assert body['code'] == 301
    assert poll_reply(app, PHONE_A)['data']['id'] == world.reply
    assert reply_tasks(ok_run)[0]['status'] == 'claimed'


UNKNOWN = [
    ('reply_comment_is_success', lambda s: UNKNOWN_ID, '任务不存在'),
    ('reply_comment_is_success', lambda s: s.note, '任务不存在'),  # a release task is no reply task
    ('reply_comment_is_delete', lambda s: UNKNOWN_ID, '评论不存在'),
    ('comment_post_exception_instead', lambda s: UNKNOWN_ID, '评论不存在'),
]


@pytest.mark.parametrize('op, unknown, msg', UNKNOWN, ids=['reply-unknown', 'reply-release-task',
                                                          'delete-unknown', 'exception-unknown'])
def test_unknown_id_is_refused_and_changes_nothing(app, ok_run, world, op, unknown, msg):
    before = snapshot(ok_run)
    body = post(app, op, {'comment_id': unknown(world)})
    assert (body['code'], body['msg'], body['data']) == (301, msg, {})
    assert snapshot(ok_run) == before


# --------------------------------------------------------------------------
# Paths: DMS_screenshots, the earlier server's comment_management names, prefix and /0
# --------------------------------------------------------------------------

def check_add_comment(body, s, app, ok_run):
    assert body['msg'] == '创建成功'
    assert [r['id'] for r in listed(ok_run)] == [s.comment, body['data']['id']]


def check_save_screenshots(body, s, app, ok_run):
    assert body['msg'] == '提交成功'
    assert body['data']['keys'] == [body['data']['key']]
    key = urllib.parse.urlparse(body['data']['key'])
    assert re.fullmatch(r'/media/[0-9a-f]{32}\.png', key.path)
    assert app.get(key.path).body == base64.b64decode(b64('dm.png'))


def check_query_reply_task(body, s, app, ok_run):
    assert body['msg'] == '查询成功'
    assert (body['data']['id'], body['data']['comment_response']) == (s.reply, REPLY_TEXT)


def check_reply_done(body, s, app, ok_run):
    assert body['msg'] == '成功'
    assert listed(ok_run)[0]['reply'] == 'done'


def check_query_delete_task(body, s, app, ok_run):
    assert body['msg'] == '查询成功'
    assert (body['data']['id'], body['data']['user_name']) == (s.comment, '路人1')


def check_deleted(body, s, app, ok_run):
    assert body['msg'] == '操作完成'
    assert listed(ok_run)[0]['delete'] == 'deleted'


def check_failed(body, s, app, ok_run):
    assert body['msg'] == '删除异常成功'
    assert listed(ok_run)[0]['delete'] == 'failed'


def check_associated(body, s, app, ok_run):
    assert (body['msg'], body['data']) == ('关联成功', {'biji_id': s.note})
    assert correlation(app, OTHER_ARTICLE) == {'flag': True, 'biji_id': s.note}


def check_correlation(body, s, app, ok_run):
    assert (body['msg'], body['data']) == ('查询完成', {'flag': True, 'biji_id': s.note})


# operation -> (the earlier server's method for it, the check of its answer and effect)
OPERATIONS = {
    'add_comment': ('POST', check_add_comment),
    'save_screenshots': ('POST', check_save_screenshots),
    'query_reply_task': ('GET', check_query_reply_task),
    'reply_comment_is_success': ('POST', check_reply_done),
    'query_delete_task': ('GET', check_query_delete_task),
    'reply_comment_is_delete': ('POST', check_deleted),
    'comment_post_exception_instead': ('POST', check_failed),
    'associate_notes': ('POST', check_associated),
    'determine_correlation': ('GET', check_correlation),
}
OLD_NAMES = {'add_comment': 'mobile_phone_reviews', 'associate_notes': 'associated_screenshots',
             'query_delete_task': 'query_delete_comment'}
PATH_FORMS = ['/{}', '/{}/0', '/{}/', '/{}/0/', '/api_hurong/{}', '/api_hurong/{}/0/']
# Every operation under its own name; the earlier server's names in every form its phones use.
ROUTES = [('/DMS_screenshots/' + op, op) for op in OPERATIONS] + [
    (form.format('comment_management/' + OLD_NAMES.get(op, op)), op)
    for op in OPERATIONS if op != 'save_screenshots' for form in PATH_FORMS]


@pytest.mark.parametrize('path, op', ROUTES, ids=[path for path, _ in ROUTES])
def test_comment_operation_answers_on_its_paths(app, ok_run, world, path, op):
    method, check = OPERATIONS[op]
    body = app.call(path, full_params(op, world), method=method,
                    encoding='query' if method == 'GET' else 'form')
    assert body['code'] == 200, body
    check(body, world, app, ok_run)


@pytest.mark.parametrize('op', OPERATIONS)
def test_comment_operation_answers_the_other_method_alike(app, ok_run, world, op):
    method, check = OPERATIONS[op]
    other = 'POST' if method == 'GET' else 'GET'
    body = app.call(dms(op), full_params(op, world), method=other,
                    encoding='query' if other == 'GET' else 'form')
    assert body['code'] == 200, body
    check(body, world, app, ok_run)


# --------------------------------------------------------------------------
# The document's wrong paths dispatch by their parameters
# --------------------------------------------------------------------------

def test_save_screenshots_carrying_comments_content_adds_a_comment(app, ok_run):
    body = post(app, 'save_screenshots', dict(PHONE_A, **comment(3)))
    assert (body['code'], body['msg']) == (200, '创建成功')
    assert without_time(listed(ok_run)) == [row(body['data']['id'], PHONE_A['imsi'], 3)]
    again = post(app, 'save_screenshots', dict(PHONE_A, **comment(3)))
    assert (again['msg'], again['data']) == ('重复评论', body['data'])


def test_save_screenshots_without_comments_content_stores_the_images(app, ok_run):
    images = [b64('note.png'), b64('dm.png'), b64('note.jpg')]
    body = app.ok(dms('save_screenshots'), dict(PHONE_A, img_base64_data=images), encoding='json',
                  method='POST')
    assert body['msg'] == '提交成功'
    keys = body['data']['keys']
    assert len(keys) == 3 and len(set(keys)) == 3 and body['data']['key'] == keys[0]
    for key, image in zip(keys, ('note.png', 'dm.png', 'note.jpg')):
        assert key.startswith(HOST + '/media/')
        assert app.get(urllib.parse.urlparse(key).path).body == base64.b64decode(b64(image))
    assert listed(ok_run) == []


def test_save_screenshots_resent_answers_the_same_address(app):
    assert upload_article(app) == upload_article(app)


def test_reply_comment_is_success_carrying_notes_url_links_the_note(app, ok_run):
    note = publish_note(app, ok_run)
    body = post(app, 'reply_comment_is_success', {'notes_url': NOTE_URL, 'screenshots': ARTICLE})
    assert (body['code'], body['msg'], body['data']) == (200, '关联成功', {'biji_id': note})
    assert correlation(app, ARTICLE) == {'flag': True, 'biji_id': note}


def test_reply_comment_is_success_with_comment_id_completes_the_reply_even_with_notes_url(
        app, ok_run, world):
    body = post(app, 'reply_comment_is_success', {'comment_id': world.reply, 'notes_url': NOTE_URL,
                                                  'screenshots': OTHER_ARTICLE})
    assert (body['code'], body['msg']) == (200, '成功')
    assert reply_tasks(ok_run)[0]['status'] == 'done'
    assert correlation(app, OTHER_ARTICLE) == {'flag': False, 'biji_id': None}


def test_query_reply_task_with_task_type_delete_polls_deletions(app, ok_run, world):
    body = app.ok(dms('query_reply_task'), dict(PHONE_A, task_type='delete'))
    assert body['data']['id'] == world.comment
    assert body['data']['user_name'] == '路人1'
    assert 'comment_response' not in body['data']
    assert poll_reply(app, PHONE_A)['data']['id'] == world.reply


def test_query_reply_task_with_task_type_delete_and_nothing_ordered_has_no_task(app, ok_run):
    report(app)
    assert_no_task(app.ok(dms('query_reply_task'), dict(PHONE_A, task_type='delete')))


# --------------------------------------------------------------------------
# Reply tasks
# --------------------------------------------------------------------------

def test_reply_task_carries_the_comment_and_the_operators_answer(app, ok_run):
    add_phone(ok_run, PHONE_A, 'A-01')
    comment_id = report(app, n=4)
    before = time.time()
    task_id = order_reply(ok_run, comment_id)
    after = time.time()
    body = poll_reply(app, PHONE_A)
    assert (body['code'], body['msg']) == (200, '查询成功')
    data = dict(body['data'])
    created = data.pop('create_datetime')
    data.pop('comment_type')
    expected = comment(4)
    assert data == {'id': task_id, 'comments_content': expected['comments_content'],
                    'nick_name': expected['nick_name'],
                    'article_picture_address': expected['article_picture_address'],
                    'screenshots_address': expected['screenshots_address'],
                    'platform': 1, 'comment_response': REPLY_TEXT, 'comment_id': comment_id,
                    'comments_status': expected['comments_status']}
    assert DATETIME_RE.match(created)
    assert int(before) <= time.mktime(time.strptime(created, '%Y-%m-%d %H:%M:%S')) <= after


def test_reply_task_comment_type_is_1_reply_to_comment(app, ok_run):
    # The earlier server's comment_type is the reply's type (1 回复评论, 2 回复私信), not the
    # comment's comments_status; its phones only ever got 1.
    order_reply(ok_run, report(app, comments_status='2'))
    assert poll_reply(app, PHONE_A)['data']['comment_type'] == 1


def test_reply_poll_without_task_answers_no_task(app):
    assert_no_task(poll_reply(app, PHONE_A))


def test_reply_task_goes_only_to_the_phone_that_reported_the_comment(app, ok_run):
    task_id = order_reply(ok_run, report(app, PHONE_A))
    assert_no_task(poll_reply(app, PHONE_B))
    assert poll_reply(app, PHONE_A)['data']['id'] == task_id
    assert_no_task(poll_reply(app, PHONE_B))


def test_reply_tasks_come_oldest_first_and_again_until_done(app, ok_run):
    first, second = report(app, n=1), report(app, n=2)
    older = order_reply(ok_run, second, '先回第二条')
    newer = order_reply(ok_run, first, '再回第一条')
    for _ in range(3):
        assert poll_reply(app, PHONE_A)['data']['id'] == older
    complete_reply(app, older)
    for _ in range(2):
        assert poll_reply(app, PHONE_A)['data']['comment_response'] == '再回第一条'
    complete_reply(app, newer)
    assert_no_task(poll_reply(app, PHONE_A))
    assert [(t['id'], t['status']) for t in reply_tasks(ok_run)] == [(older, 'done'), (newer, 'done')]


def test_each_reply_to_one_comment_is_its_own_task(app, ok_run):
    comment_id = report(app)
    first = order_reply(ok_run, comment_id, '谢谢～')
    assert poll_reply(app, PHONE_A)['data']['id'] == first
    complete_reply(app, first)
    second = order_reply(ok_run, comment_id, '补充：链接已私信💌')
    assert second != first
    data = poll_reply(app, PHONE_A)['data']
    assert (data['id'], data['comment_response']) == (second, '补充：链接已私信💌')
    complete_reply(app, second)
    assert_no_task(poll_reply(app, PHONE_A))
    only = listed(ok_run)[0]
    assert (only['reply'], only['reply_text'], only['replies']) == ('done', '补充：链接已私信💌', 2)


COMPLETION_TIMES = [
    ('2026-01-02 03:04:05', 'form'),
    ('2026-01-02T03:04:05', 'form'),
    ('2026-01-02 03:04:05', 'query'),
    (str(int(time.mktime((2026, 1, 2, 3, 4, 5, 0, 0, -1)))), 'form'),
    (str(int(time.mktime((2026, 1, 2, 3, 4, 5, 0, 0, -1))) * 1000), 'multipart'),
    (int(time.mktime((2026, 1, 2, 3, 4, 5, 0, 0, -1))), 'json'),
    (int(time.mktime((2026, 1, 2, 3, 4, 5, 0, 0, -1))) * 1000, 'json'),
]


@pytest.mark.parametrize('value, encoding', COMPLETION_TIMES)
def test_reply_completion_time_is_taken_as_time_or_epoch(app, ok_run, world, value, encoding):
    body = app.call(dms('reply_comment_is_success'),
                    {'comment_id': world.reply, 'comment_completion_time': value},
                    method='POST', encoding=encoding)
    assert (body['code'], body['msg']) == (200, '成功')
    assert reply_tasks(ok_run)[0]['done_at'] == local_iso(2026, 1, 2, 3, 4, 5)


def test_reply_completion_without_time_is_done_now(app, ok_run, world):
    before = datetime.datetime.now().astimezone().replace(microsecond=0)
    complete_reply(app, world.reply)
    done_at = datetime.datetime.fromisoformat(reply_tasks(ok_run)[0]['done_at'])
    assert before <= done_at <= datetime.datetime.now().astimezone()


def test_repeated_reply_completion_answers_success_and_changes_nothing(app, ok_run, world):
    complete_reply(app, world.reply, comment_completion_time='2026-01-02 03:04:05')
    before = snapshot(ok_run)
    complete_reply(app, world.reply, comment_completion_time='2026-02-03 04:05:06')
    assert snapshot(ok_run) == before
    assert reply_tasks(ok_run)[0]['done_at'] == local_iso(2026, 1, 2, 3, 4, 5)


# --------------------------------------------------------------------------
# Delete tasks
# --------------------------------------------------------------------------

def test_delete_task_names_comment_commenter_phone_and_account(app, ok_run):
    add_phone(ok_run, PHONE_A, 'A-01')
    bind_account(app, PHONE_A, ACCOUNT_A)
    comment_id = report(app, n=5)
    order_delete(ok_run, comment_id)
    body = poll_delete(app, PHONE_A)
    assert (body['code'], body['msg']) == (200, '查询成功')
    expected = comment(5)
    assert {key: body['data'][key] for key in ('id', 'comments_content', 'screenshots_address',
                                                'phone_name', 'user_name', 'blogger_name', 'platform')} == {
        'id': comment_id, 'comments_content': expected['comments_content'],
        'screenshots_address': expected['screenshots_address'], 'phone_name': 'A-01',
        'user_name': expected['nick_name'], 'blogger_name': ACCOUNT_A['name'], 'platform': 1}


def test_delete_poll_without_orders_answers_no_task(app, ok_run):
    order_reply(ok_run, report(app))
    assert_no_task(poll_delete(app, PHONE_A))


def test_delete_task_goes_only_to_the_phone_that_reported_the_comment(app, ok_run):
    comment_id = report(app, PHONE_A)
    report(app, PHONE_B, n=2)
    order_delete(ok_run, comment_id)
    assert_no_task(poll_delete(app, PHONE_B))
    assert poll_delete(app, PHONE_A)['data']['id'] == comment_id
    assert_no_task(poll_delete(app, PHONE_B))


def test_delete_tasks_come_oldest_order_first_and_again_until_reported(app, ok_run):
    ids = [report(app, n=n) for n in (1, 2, 3)]
    for comment_id in (ids[1], ids[2], ids[0]):
        order_delete(ok_run, comment_id)
    assert ok_run('comments', 'delete', ids[1]).stdout == 'comment %d was already ordered deleted\n' % ids[1]
    for expected in (ids[1], ids[2], ids[0]):
        for _ in range(2):
            assert poll_delete(app, PHONE_A)['data']['id'] == expected
        report_deleted(app, expected)
    assert_no_task(poll_delete(app, PHONE_A))
    assert [r['delete'] for r in listed(ok_run)] == ['deleted'] * 3


def test_failed_deletion_leaves_the_queue_until_ordered_again(app, ok_run):
    comment_id = report(app)
    order_delete(ok_run, comment_id)
    assert poll_delete(app, PHONE_A)['data']['id'] == comment_id
    report_failed(app, comment_id)
    assert_no_task(poll_delete(app, PHONE_A))
    assert listed(ok_run)[0]['delete'] == 'failed'
    assert [r['id'] for r in listed(ok_run, '--status', 'failed')] == [comment_id]
    order_delete(ok_run, comment_id)
    assert listed(ok_run)[0]['delete'] == 'ordered'
    assert poll_delete(app, PHONE_A)['data']['id'] == comment_id
    report_deleted(app, comment_id)
    assert_no_task(poll_delete(app, PHONE_A))
    assert listed(ok_run)[0]['delete'] == 'deleted'


@pytest.mark.parametrize('report_outcome, state', [(report_deleted, 'deleted'), (report_failed, 'failed')],
                         ids=['deleted', 'exception'])
def test_repeated_deletion_report_answers_success_and_changes_nothing(app, ok_run, world,
                                                                       report_outcome, state):
    report_outcome(app, world.comment)
    before = snapshot(ok_run)
    report_outcome(app, world.comment)
    assert snapshot(ok_run) == before
    assert listed(ok_run)[0]['delete'] == state


def test_exception_after_deleted_is_a_conflict_and_changes_nothing(app, ok_run, world):
    report_deleted(app, world.comment)
    before = snapshot(ok_run)
    body = post(app, 'comment_post_exception_instead', {'comment_id': world.comment})
    assert (body['code'], body['msg'], body['data']) == (301, '状态冲突', {})
    assert snapshot(ok_run) == before
    assert listed(ok_run)[0]['delete'] == 'deleted'


def test_deleted_comment_cannot_be_ordered_deleted_again(app, run, ok_run, world):
    report_deleted(app, world.comment)
    assert_fails_in_one_line(run('comments', 'delete', world.comment),
                             'comment %d is already deleted' % world.comment)
    assert listed(ok_run)[0]['delete'] == 'deleted'
    assert_no_task(poll_delete(app, PHONE_A))


# --------------------------------------------------------------------------
# Notes: linking article screenshots, correlation, comments tied to notes
# --------------------------------------------------------------------------

def test_comment_without_note_id_is_tied_to_the_note_of_its_article_screenshot(app, ok_run):
    add_phone(ok_run, PHONE_A, 'A-01')
    note = publish_note(app, ok_run)
    article = upload_article(app)
    body = link(app, NOTE_URL, article)
    assert (body['code'], body['msg'], body['data']) == (200, '关联成功', {'biji_id': note})
    comment_id = report(app, article_picture_address=article)
    unlinked = report(app, n=2, article_picture_address=OTHER_ARTICLE)
    assert without_time(listed(ok_run)) == [
        row(comment_id, 'A-01', fields=comment(1, article_picture_address=article), note=note),
        row(unlinked, 'A-01', fields=comment(2, article_picture_address=OTHER_ARTICLE))]


@pytest.mark.parametrize('notes_url', [
    NOTE_URL,
    'https://www.xiaohongshu.com/explore/%s' % NOTE_HEX,
    'https://www.xiaohongshu.com/explore/%s?xsec_token=ZZ99&app_platform=android#comments' % NOTE_HEX,
    'https://www.xiaohongshu.com/discovery/item/%s?share_from_user_hidden=true' % NOTE_HEX,
], ids=['as-published', 'without-query', 'other-query-and-fragment', 'note-id-in-other-url'])
def test_associate_notes_finds_the_published_note(app, ok_run, notes_url):
    publish_note(app, ok_run, url='https://www.xiaohongshu.com/user/profile/x?a=1')
    note = publish_note(app, ok_run)
    body = link(app, notes_url, ARTICLE)
    assert (body['code'], body['msg'], body['data']) == (200, '关联成功', {'biji_id': note})
    assert correlation(app, ARTICLE) == {'flag': True, 'biji_id': note}


def test_associate_notes_again_answers_repeat_link(app, ok_run):
    note = publish_note(app, ok_run)
    link(app, NOTE_URL, ARTICLE)
    for url in (NOTE_URL, 'https://www.xiaohongshu.com/explore/%s#top' % NOTE_HEX):
        body = link(app, url, ARTICLE)
        assert (body['code'], body['msg'], body['data']) == (200, '重复关联', {'biji_id': note})


@pytest.mark.parametrize('notes_url', [
    'https://www.xiaohongshu.com/explore/%s' % ('b' * 24),
    'https://www.xiaohongshu.com/explore/unpublished',
], ids=['other-note-id', 'unknown-url'])
def test_associate_notes_with_unknown_note_is_refused(app, ok_run, notes_url):
    publish_note(app, ok_run)
    ok_run('tasks', 'add-release', '--content', '还没发布的笔记')
    body = link(app, notes_url, ARTICLE)
    assert (body['code'], body['msg'], body['data']) == (301, '笔记不存在', {})
    assert correlation(app, ARTICLE) == {'flag': False, 'biji_id': None}


@pytest.mark.parametrize('asked', [ARTICLE, ARTICLE + '?imageView2/2/w/1080', ARTICLE + '#full',
                                   ARTICLE + '?x-oss-process=image&v=2#top'])
def test_determine_correlation_ignores_query_and_fragment(app, ok_run, asked):
    note = publish_note(app, ok_run)
    link(app, NOTE_URL, ARTICLE + '?from=phone')
    assert correlation(app, asked) == {'flag': True, 'biji_id': note}


def test_determine_correlation_of_unlinked_screenshot_is_false_with_null_note(app, ok_run):
    publish_note(app, ok_run)
    link(app, NOTE_URL, ARTICLE)
    body = app.ok(dms('determine_correlation'), {'screenshots': OTHER_ARTICLE})
    assert (body['msg'], body['data']) == ('查询完成', {'flag': False, 'biji_id': None})


# --------------------------------------------------------------------------
# The operator's CLI
# --------------------------------------------------------------------------

@pytest.fixture
def moderated(app, ok_run):
    """Six comments, one in each moderation state, on phones A-01 (n1-n3) and B-02 (n4-n6)."""
    add_phone(ok_run, PHONE_A, 'A-01')
    add_phone(ok_run, PHONE_B, 'B-02')
    ids = [report(app, PHONE_A if n <= 3 else PHONE_B, n) for n in range(1, 7)]
    complete_reply(app, order_reply(ok_run, ids[2], '已回复'))   # n3 replied
    order_reply(ok_run, ids[1], '待回复')                        # n2 reply pending
    for comment_id in ids[3:]:
        order_delete(ok_run, comment_id)
    report_deleted(app, ids[4])                                   # n5 deleted
    report_failed(app, ids[5])                                    # n6 failed
    return ids


@pytest.mark.parametrize('state, expected', [
    ('none', [1, 2, 3]), ('ordered', [4]), ('deleted', [5]), ('failed', [6]),
    ('unanswered', [1, 4, 5, 6]), ('replied', [3]),
])
def test_comments_list_filters_by_status(ok_run, moderated, state, expected):
    assert [r['id'] for r in listed(ok_run, '--status', state)] == [moderated[n - 1] for n in expected]


@pytest.mark.parametrize('phone, expected', [
    ('A-01', [1, 2, 3]), ('B-02', [4, 5, 6]), (PHONE_B['imsi'], [4, 5, 6]), (PHONE_A['iccid'], [1, 2, 3]),
])
def test_comments_list_filters_by_phone(ok_run, moderated, phone, expected):
    assert [r['id'] for r in listed(ok_run, '--phone', phone)] == [moderated[n - 1] for n in expected]


def test_comments_list_combines_status_and_phone(ok_run, moderated):
    assert [r['id'] for r in listed(ok_run, '--status', 'unanswered', '--phone', 'A-01')] == [moderated[0]]
    assert listed(ok_run, '--status', 'none', '--phone', 'B-02') == []


def test_comments_list_json_shows_every_state(ok_run, moderated):
    ids = moderated
    assert without_time(listed(ok_run)) == [
        row(ids[0], 'A-01', 1),
        row(ids[1], 'A-01', 2, reply='pending', reply_text='待回复', replies=1),
        row(ids[2], 'A-01', 3, reply='done', reply_text='已回复', replies=1),
        row(ids[3], 'B-02', 4, delete='ordered'),
        row(ids[4], 'B-02', 5, delete='deleted'),
        row(ids[5], 'B-02', 6, delete='failed'),
    ]


def test_comments_list_json_prints_one_array_even_when_empty(ok_run):
    assert ok_run('comments', 'list', '--json').stdout.strip() == '[]'


def test_comments_list_table_shows_commenter_text_note_screenshot_reply_and_delete(app, ok_run):
    add_phone(ok_run, PHONE_A, 'A-01')
    note = publish_note(app, ok_run)
    shot = upload_article(app, image='dm.png')
    comment_id = report(app, nick_name='小雨', comments_content='在哪买的？', article_notes_id=note,
                        screenshots_address=shot)
    complete_reply(app, order_reply(ok_run, comment_id, '主页有链接'))
    order_delete(ok_run, comment_id)
    lines = ok_run('comments', 'list').stdout.splitlines()
    assert len(lines) == 2
    assert lines[0].split() == ['ID', 'PHONE', 'BY', 'COMMENT', 'NOTE', 'REPLY', 'DELETE', 'SCREENSHOT']
    assert lines[1].split() == [str(comment_id), 'A-01', '小雨', '在哪买的？', str(note), 'done', 'ordered', shot]


def test_status_json_counts_the_comment_queues(ok_run, moderated):
    status = json.loads(ok_run('status', '--json').stdout)
    assert status['comments'] == {'none': 3, 'ordered': 1, 'deleted': 1, 'failed': 1}
    assert status['tasks']['comment_reply'] == {'pending': 1, 'claimed': 0, 'done': 1, 'cancelled': 0}


@pytest.mark.parametrize('args', [('comments', 'reply', UNKNOWN_ID, '你好'), ('comments', 'delete', UNKNOWN_ID)],
                         ids=['reply', 'delete'])
def test_comments_command_on_unknown_id_fails_in_one_line(run, ok_run, moderated, args):
    before = snapshot(ok_run)
    assert_fails_in_one_line(run(*args), 'no comment %d' % UNKNOWN_ID)
    assert snapshot(ok_run) == before


# --------------------------------------------------------------------------
# A morning of moderation on two phones
# --------------------------------------------------------------------------

SCENARIO = {  # key -> (phone, nick name, comment)
    'a1': (PHONE_A, '路人甲', '求链接🙏'),
    'a2': (PHONE_A, '小雨', '这件外套在哪买的？'),
    'a3': (PHONE_A, '广告哥', '加V看更多福利💰'),
    'a4': (PHONE_A, '杠精本精', '一看就是摆拍'),
    'a5': (PHONE_A, '阿花', '好喜欢这个配色😍'),
    'b1': (PHONE_B, '路人甲', '求链接🙏'),
    'b2': (PHONE_B, '刷单小号', '低价代购私聊'),
    'b3': (PHONE_B, '喷子', '难看死了'),
    'b4': (PHONE_B, 'Mia', '姐妹身高多少呀'),
    'b5': (PHONE_B, '🍠薯条', '已关注～'),
}


def scenario_fields(key):
    _, nick, text = SCENARIO[key]
    return comment(list(SCENARIO).index(key) + 1, nick_name=nick, comments_content=text)


def drain_replies(app, phone, expected):
    """The phone answers every reply task it is given; `expected` is [(task id, comment key)]."""
    for task_id, key in expected:
        data = poll_reply(app, phone)['data']
        assert (data['id'], data['nick_name'], data['comments_content']) == (task_id,) + SCENARIO[key][1:]
        assert poll_reply(app, phone)['data']['id'] == task_id  # lost answer: same task again
        complete_reply(app, task_id)
    assert_no_task(poll_reply(app, phone))


def test_two_phones_each_complete_only_their_own_moderation_tasks(app, ok_run):
    add_phone(ok_run, PHONE_A, 'A-01')
    add_phone(ok_run, PHONE_B, 'B-02')
    bind_account(app, PHONE_A, ACCOUNT_A)
    bind_account(app, PHONE_B, ACCOUNT_B)
    ids = {}
    for key, (phone, _, _) in SCENARIO.items():
        ids[key] = report(app, phone, encoding='form' if phone is PHONE_A else 'json',
                          **scenario_fields(key))
    resent = post(app, 'add_comment', dict(PHONE_A, **scenario_fields('a3')))
    assert (resent['msg'], resent['data']) == ('重复评论', {'id': ids['a3']})

    texts = {'a1': '链接在主页哦～', 'a2': '在淘宝搜同款🔍', 'b1': '私信你啦', 'b4': '165cm～'}
    tasks = {key: order_reply(ok_run, ids[key], text) for key, text in texts.items()}
    for key in ('a3', 'b2', 'a4', 'b3'):
        order_delete(ok_run, ids[key])

    drain_replies(app, PHONE_B, [(tasks['b1'], 'b1'), (tasks['b4'], 'b4')])
    drain_replies(app, PHONE_A, [(tasks['a1'], 'a1'), (tasks['a2'], 'a2')])
    follow_up = order_reply(ok_run, ids['a1'], '已私信💌')
    assert_no_task(poll_reply(app, PHONE_B))
    drain_replies(app, PHONE_A, [(follow_up, 'a1')])

    for phone, key, report_outcome in ((PHONE_A, 'a3', report_deleted), (PHONE_B, 'b2', report_deleted),
                                       (PHONE_A, 'a4', report_failed), (PHONE_B, 'b3', report_deleted)):
        data = poll_delete(app, phone)['data']
        assert (data['id'], data['user_name'], data['phone_name'], data['blogger_name']) == (
            ids[key], SCENARIO[key][1], 'A-01' if phone is PHONE_A else 'B-02',
            (ACCOUNT_A if phone is PHONE_A else ACCOUNT_B)['name'])
        report_outcome(app, ids[key])
    assert_no_task(poll_delete(app, PHONE_A))
    assert_no_task(poll_delete(app, PHONE_B))
    assert [r['id'] for r in listed(ok_run, '--status', 'failed')] == [ids['a4']]

    order_delete(ok_run, ids['a4'])
    assert_no_task(poll_delete(app, PHONE_B))
    assert poll_delete(app, PHONE_A)['data']['id'] == ids['a4']
    report_deleted(app, ids['a4'])
    assert_no_task(poll_delete(app, PHONE_A))

    last_reply = dict(texts, a1='已私信💌')
    replies = {'a1': 2, 'a2': 1, 'b1': 1, 'b4': 1}
    assert without_time(listed(ok_run)) == [
        row(ids[key], 'A-01' if key < 'b' else 'B-02', fields=scenario_fields(key),
            reply='done' if key in replies else None, reply_text=last_reply.get(key),
            replies=replies.get(key, 0), delete='deleted' if key in ('a3', 'a4', 'b2', 'b3') else 'none')
        for key in SCENARIO]
    assert [(t['id'], t['status'], t['phone'], t['comment_id']) for t in reply_tasks(ok_run)] == [
        (tasks['a1'], 'done', 'A-01', ids['a1']), (tasks['a2'], 'done', 'A-01', ids['a2']),
        (tasks['b1'], 'done', 'B-02', ids['b1']), (tasks['b4'], 'done', 'B-02', ids['b4']),
        (follow_up, 'done', 'A-01', ids['a1'])]
    status = json.loads(ok_run('status', '--json').stdout)
    assert status['comments'] == {'none': 6, 'deleted': 4}
    assert status['tasks']['comment_reply'] == {'pending': 0, 'claimed': 0, 'done': 5, 'cancelled': 0}
