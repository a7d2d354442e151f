"""Print SQLite's query plan for every hot query (the README's performance section shows it).

    python bench/plans.py

Every query a phone's poll, heartbeat, log line or claim runs must be served by
an index: no `SCAN` of a table that grows (task, log, comment, code, number),
no temporary B-tree over one of them. The two exceptions are read once a second,
not per request: the phone table (a row per phone, read whole into memory) and
the partial index of claimed tasks (a row per task handed out and not yet done).
"""
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import models  # noqa: E402

ARGS = {'kind': 'release', 'phone': 1, 'account': 'x', 'now': 0.0, 'iccid': 'c', 'n': 1, 'until': 0.0}


def logs_query_sql():
    """The SQL of `xhs-server logs --phone X --limit 100`."""
    import cli
    query = cli.log_query(None, None, None).where(models.Log.phone == 1)
    return query.order_by(models.Log.id.desc()).limit(100).sql()


HOT = [
    ('the phone table, read into memory at most once a second (a copy; phones are found there)',
     models._PHONES_SQL, ()),
    ('tasks pending and held, read with it', models._WAITING_SQL, ()),
    ('', models._HOLDERS_SQL, ()),
    ('phone by SIM (a phone not in the copy)', models._PHONE_SELECT + 'WHERE imsi = ? AND iccid = ?', ('a', 'b')),
    ('coverage phone by MAC (a phone not in the copy)', models._PHONE_BY_MAC, ('m',)),
    ('activity stamp', 'UPDATE phone SET last_seen = ?, last_ip = ? WHERE id = ?', (0, '', 1)),
    ('log line', 'INSERT INTO log (at, phone_id, msg) VALUES (?, ?, ?)', (0, 1, 'x')),
    ('task poll: phone by SIM, and anything at all?',
     models._PHONE_WAITING_SELECT + 'WHERE imsi = ? AND iccid = ?', ('release', 'release', 'a', 'b')),
    ('task poll: own or waiting', models._LOOK_SQL, ARGS),
    ('task claim', models._CLAIM_SQL, ARGS),
    ('task completion', 'UPDATE task SET status = ?, done_at = ? WHERE id = ? AND kind = ? AND status != ?',
     ('done', 0, 1, 'reply', 'done')),
    ('number binding', models._BIND_SQL, ARGS),
    ('verification code', 'SELECT code, received_at FROM code WHERE number = ? AND received_at >= ? '
     'AND code IS NOT NULL ORDER BY received_at DESC, id DESC LIMIT 1', ('1', 0)),
    ('comment delete queue', 'SELECT c.id FROM comment c WHERE c.phone_id = ? AND c.delete_state = '
     "'ordered' ORDER BY c.delete_ordered_at, c.id LIMIT 1", (1,)),
    ('profile reservation', 'SELECT id FROM profile WHERE %s OR %s ORDER BY %s DESC, id LIMIT :n'
     % (models._FREE_PROFILE, models._OWN_PROFILE, models._OWN_PROFILE), ARGS),
]


def main():
    folder = tempfile.mkdtemp()
    models.init_db(os.path.join(folder, 'plans.db'))
    for title, sql, params in HOT + [('operator: logs --phone X --limit 100',) + logs_query_sql()]:
        if title:
            print('-- %s' % title)
        for row in models.db.execute_sql('EXPLAIN QUERY PLAN ' + sql, params):
            print('   ' + row[3])
    models.db.close()


if __name__ == '__main__':
    main()
