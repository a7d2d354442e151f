"""Exclusive hand-out under real concurrency, against a real server on loopback."""
import json
from collections import Counter

from conftest import run_threads


def sim(n):
    return {'imsi': '4600199%08d' % n, 'iccid': '8986019900%010d' % n}


def test_twenty_phones_drain_forty_release_tasks_each_handed_out_once(live, tmp_path):
    server = live()
    lines = '\n'.join(json.dumps({'content': '笔记 %d' % i}) for i in range(40))
    (tmp_path / 'tasks.jsonl').write_text(lines, encoding='utf-8')
    server.cli('tasks', 'import', tmp_path / 'tasks.jsonl')
    handed = []   # (task id, phone index), from every answer
    completed = Counter()

    def phone(i):
        while True:
            body = server.call('/xiaohongshu_biji/get_release_task/0', sim(i), method='POST')
            assert body['code'] == 200, body
            if not body['data']:
                return
            task_id = body['data']['id']
            handed.append((task_id, i))
            done = server.call('/xiaohongshu_biji/upload_url/0', dict(
                sim(i), task_id=task_id, url='https://www.xiaohongshu.com/explore/%024x' % task_id))
            assert done['code'] == 200, done
            completed[task_id] += 1

    run_threads(20, phone)
    owners = {}
    for task_id, i in handed:
        owners.setdefault(task_id, set()).add(i)
    assert len(owners) == 40
    assert all(len(phones) == 1 for phones in owners.values()), owners
    assert all(count == 1 for count in completed.values()) and len(completed) == 40
    tasks = json.loads(server.cli('tasks', 'list', '--json').stdout)
    assert Counter(task['status'] for task in tasks) == {'done': 40}


def test_thirty_sims_race_for_fifteen_numbers_each_bound_once(live, tmp_path):
    server = live()
    (tmp_path / 'numbers.txt').write_text('\n'.join('139%08d' % i for i in range(15)))
    server.cli('numbers', 'import', tmp_path / 'numbers.txt')
    answers = {}

    def phone(i):
        first = server.call('/xhs_phone_management/get_phone_number/0', sim(i), method='GET')
        again = server.call('/xhs_phone_management/get_phone_number/0', sim(i), method='GET')
        assert first['code'] == 200 and again['data'] == first['data'], (first, again)
        answers[i] = first['data']['phone_number']

    run_threads(30, phone)
    given = [number for number in answers.values() if number]
    assert len(answers) == 30
    assert sorted(given) == sorted('139%08d' % i for i in range(15))
    assert Counter(answers.values())[''] == 15
    numbers = json.loads(server.cli('numbers', 'list', '--json').stdout)
    assert all(row['phone'] for row in numbers) and len({row['phone'] for row in numbers}) == 15
