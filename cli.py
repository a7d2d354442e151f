"""xhs-server's command line: the operator's tools and the server itself.

Every command works on the live database (SQLite WAL, busy timeout), so the
operator can run them while phones are being served.
"""
import csv
import datetime
import functools
import getpass
import io
import json
import os
import re
import sqlite3
import sys
import time
import unicodedata

import click
import peewee

import models
from models import (Audit, Code, Comment, Conflict, Log, Number, NotFound, Phone, Profile, Task,
                    db, fmt_time, now)

PROGRESS_FROM = 2000   # imports of more lines than this show a progress bar


# --------------------------------------------------------------------------
# Helpers: database, output, times
# --------------------------------------------------------------------------

class Group(click.Group):
    """A group that turns database and file trouble into one-line errors."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except click.UsageError as error:
            # One line, not click's usage block: the operator reads the error, not a manual.
            raise click.ClickException(error.format_message()) from None
        except (peewee.OperationalError, sqlite3.OperationalError) as error:
            if 'locked' in str(error) or 'busy' in str(error):
                raise click.ClickException('the database stayed busy; try again') from None
            raise click.ClickException('database error: %s' % error) from None
        except (peewee.DatabaseError, sqlite3.DatabaseError) as error:
            raise click.ClickException('database error: %s' % error) from None
        except BrokenPipeError:
            # `xhs-server logs | head`: the reader left; stop quietly, as other tools do.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(1)
        except OSError as error:
            raise click.ClickException(str(error)) from None
        except UnicodeEncodeError:
            raise click.ClickException('arguments must be UTF-8 text') from None


def open_db(ctx, busy_timeout=5.0):
    options = ctx.find_root().obj
    if db.database != os.path.abspath(options['db']) or db.is_closed():
        media = os.path.join(options['data_dir'], 'media') if options['data_dir'] else None
        try:
            models.init_db(options['db'], media, busy_timeout)
        except (OSError, peewee.DatabaseError) as error:
            raise click.ClickException('cannot open database %s: %s' % (options['db'], error)) from None
    return db


def with_db(func):
    """Open the database chosen by --db / XHS_DB before the command runs."""
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        open_db(click.get_current_context())
        return func(*args, **kwargs)
    return wrapper


def done(message, secret=None):
    """Say what changed in one line, and record it in the audit trail."""
    ctx = click.get_current_context()
    params = {key: value for key, value in ctx.params.items() if value not in (None, (), False)}
    if secret:
        params = {key: ('***' if value == secret else value) for key, value in params.items()}
        message = message.replace(secret, '***')
    Audit.create(user=os_user(), command='%s %s' % (ctx.command_path, json.dumps(
        params, ensure_ascii=False, default=str)), change=message)
    click.echo(message)


def os_user():
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return str(os.getuid())


def show_time(ts):
    """A local time for people: `YYYY-MM-DD HH:MM:SS`, '-' for never."""
    return fmt_time(ts) or '-'


def iso_time(ts):
    if ts is None:
        return None
    try:
        return datetime.datetime.fromtimestamp(ts).astimezone().isoformat(timespec='seconds')
    except (ValueError, OverflowError, OSError):
        return str(ts)   # a time no calendar can show: the raw epoch rather than a crash


def width(text):
    return sum(2 if unicodedata.east_asian_width(ch) in 'WF' else 1 for ch in text)


def one_line(text):
    return ' '.join(str(text).split())


def clip(text, limit=40):
    """Free text shortened for a table cell (URLs and ids are never clipped)."""
    text = one_line('' if text is None else text)
    if width(text) <= limit:
        return text
    out = ''
    for ch in text:
        if width(out + ch) > limit - 1:
            break
        out += ch
    return out + '…'


def emit(rows, columns, as_json):
    """Print rows (dicts) as one JSON array, or as an aligned table of `columns`.

    `columns` is a list of (heading, key, formatter-or-None); JSON keeps every
    key of the rows, with times as ISO 8601.
    """
    if as_json:
        click.echo(json.dumps(rows, ensure_ascii=False, indent=1))
        return
    if not rows:
        click.echo('(none)')
        return
    table = [[heading for heading, _, _ in columns]]
    for row in rows:
        table.append([one_line(fmt(row[key]) if fmt else ('' if row[key] is None else row[key]))
                      for _, key, fmt in columns])
    widths = [max(width(str(line[i])) for line in table) for i in range(len(columns))]
    for line in table:
        cells = [str(cell) + ' ' * (widths[i] - width(str(cell))) for i, cell in enumerate(line)]
        click.echo('  '.join(cells).rstrip())


def json_times(row, *keys):
    """A row for JSON: the named epoch fields as ISO times, the raw epoch kept too."""
    for key in keys:
        row[key] = iso_time(row[key])
    return row


json_option = click.option('--json', 'as_json', is_flag=True, help='Print one JSON array, nothing else.')

# Integers the database can hold: ids, limits, priorities, platforms.
ID = click.IntRange(1, models.SQL_INT)
LIMIT = click.IntRange(1, 10 ** 9)
NUMBER = click.IntRange(-10 ** 9, 10 ** 9)

RELATIVE = re.compile(r'^([+-]?)(\d+)\s*([smhdw])$')
UNITS = {'s': 1, 'm': 60, 'h': 3600, 'd': 86400, 'w': 604800}


def parse_when(text, option):
    """Epoch seconds from a local time (`2026-12-01 18:00`) or a span (`7d` ago, `+2h` ahead),
    between the years 2000 and 2100."""
    when = parse_time_text(text.strip())
    if when is None:
        raise click.BadParameter('%r is not a time: use "YYYY-MM-DD HH:MM", "7d" (ago) or "+2h" (ahead)'
                                 % text, param_hint=option)
    if models.plausible_time(when) is None:
        raise click.BadParameter('%r is not between the years 2000 and 2100' % text, param_hint=option)
    return when


def parse_time_text(text):
    if text == 'now':
        return now()
    match = RELATIVE.match(text)
    if match:
        sign = 1 if match.group(1) == '+' else -1
        return now() + sign * min(int(match.group(2)), 10 ** 9) * UNITS[match.group(3)]
    return models.local_time(text)


def find_phone(ref):
    phone = models.resolve_phone(ref)
    if phone is None:
        raise click.ClickException('no phone %r: register it first with '
                                   '"xhs-server phones add --imsi ... --iccid ..."' % ref)
    return phone


def mask_number(number):
    return number[:3] + '****' + number[-4:] if len(number) >= 8 else '****'


def mask_code(code):
    return code[:1] + '*' * (len(code) - 2) + code[-1:] if code else ''


# --------------------------------------------------------------------------
# The group
# --------------------------------------------------------------------------

@click.group(cls=Group)
@click.option('--db', 'db_path', envvar='XHS_DB', default='./data/xhs.db', show_default=True,
              help='SQLite database file (environment XHS_DB).')
@click.option('--data-dir', envvar='XHS_DATA', default=None,
              help='Folder for stored images (its media/ subfolder); default: beside the database '
                   '(environment XHS_DATA).')
@click.version_option(package_name='xhs-server', prog_name='xhs-server')
@click.pass_context
def main(ctx, db_path, data_dir):
    """xhs-server: the phone API and the operator's tools for a studio's phone fleet.

    Start the server with "xhs-server serve"; everything else works on the same
    database while it runs.
    """
    ctx.obj = {'db': db_path, 'data_dir': data_dir}


# --------------------------------------------------------------------------
# serve
# --------------------------------------------------------------------------

@main.command()
@click.option('--host', default='0.0.0.0', show_default=True,
              help='Address to listen on. 0.0.0.0 serves every interface, so phones on the LAN '
                   'can reach it; 127.0.0.1 keeps it to this machine.')
@click.option('--port', default=8000, show_default=True, type=click.IntRange(0, 65535))
@click.option('--threads', default=8, show_default=True, type=click.IntRange(2, 1000),
              help='Workers answering requests. Idle keep-alive connections hold none; a worker '
                   'waiting on a phone\'s upload is replaced meanwhile (up to --max-threads). '
                   'More than needed only take turns at Python\'s lock.')
@click.option('--max-threads', default=64, show_default=True, type=click.IntRange(2, 4000),
              help='Most workers in all, those waiting on slow uploads included.')
@click.option('--timeout', default=60, show_default=True, type=click.IntRange(5, 3600),
              help='Seconds a phone may stay silent mid-request (slow uploads on Wi-Fi).')
@click.option('--token', envvar='XHS_TOKEN', default=None,
              help='Require this token from phones (parameter token, header X-Token or '
                   'Authorization: Bearer). Environment XHS_TOKEN.')
@click.option('--allow', multiple=True, metavar='CIDR',
              help='Allowed caller network (repeatable); default loopback and private LAN ranges.')
@click.option('--approve-new', is_flag=True, envvar='XHS_APPROVE_NEW',
              help='Refuse new phones until "phones set PHONE --approve".')
@click.option('--busy-timeout', default=5.0, show_default=True, type=click.FloatRange(0.1, 600),
              help='Seconds a request waits for a busy database before answering code 503.')
@click.option('--access-log', is_flag=True, help='Log every request (path, code, time; no parameters).')
@click.option('--alert-webhook', metavar='URL',
              help='Group-robot URL (WeCom, DingTalk, Feishu) for alerts; overrides the alert_webhook setting.')
@click.option('--monitor-interval', default=15.0, show_default=True, type=click.FloatRange(0.1, 3600),
              help='Seconds between background checks (activity history, alerts, retention).')
@click.pass_context
def serve(ctx, host, port, threads, max_threads, timeout, token, allow, approve_new, busy_timeout,
          access_log, alert_webhook, monitor_interval):
    """Run the phone API (cheroot) until Ctrl-C or SIGTERM.

    Example: xhs-server serve --port 8000
    """
    import xhs_server
    if alert_webhook and not models.is_http_url(alert_webhook):
        raise click.BadParameter('must be an http(s) URL', param_hint='--alert-webhook')
    if max_threads < threads:
        raise click.BadParameter('must be at least --threads (%d)' % threads, param_hint='--max-threads')
    open_db(ctx, busy_timeout)
    try:
        xhs_server.configure(token=token, allow=list(allow) or None, approve_new=approve_new,
                             access_log=access_log)
    except ValueError as error:
        raise click.BadParameter(str(error), param_hint='--allow') from None
    xhs_server.setup_logging()
    server = xhs_server.make_server(host, port, threads=threads, max_threads=max_threads, timeout=timeout)

    def ready(bind_addr):
        shown = xhs_server.lan_address() if host in ('0.0.0.0', '::') else host
        click.echo('xhs-server %s serving http://%s:%d/ (phones use this address)'
                   % (xhs_server.__version__, shown, bind_addr[1]))
        click.echo('database: %s' % db.database)
        click.echo('media:    %s' % models.media_dir())
        if token:
            click.echo('token required from phones')
        click.echo('press Ctrl-C to stop')
        sys.stdout.flush()

    import monitor
    try:
        xhs_server.serve(server, ready, monitor.Monitor(monitor_interval, alert_webhook))
    except OSError as error:
        raise click.ClickException('cannot listen on %s:%d: %s' % (host, port, error.strerror or error))
    db.close()
    click.echo('stopped')


# --------------------------------------------------------------------------
# status
# --------------------------------------------------------------------------

ERROR_WORDS = ('错误', '异常', '失败', '没有找到', 'error', 'exception', 'fail')


def count_by(sql, params=()):
    return {key: count for key, count in db.execute_sql(sql, params)}


def status_data():
    at = now()
    window = models.settings()['activity_window'] * 60
    stuck_after = models.settings()['stuck_minutes'] * 60
    phones = db.execute_sql(
        'SELECT COUNT(*), SUM(offline), SUM(NOT approved), '
        'SUM(NOT offline AND approved AND last_seen >= ?), '
        'SUM(NOT offline AND approved AND (last_seen IS NULL OR last_seen < ?)) FROM phone',
        (at - window, at - window)).fetchone()
    tasks = {}
    for kind, state, count in db.execute_sql('SELECT kind, status, COUNT(*) FROM task GROUP BY 1, 2'):
        tasks.setdefault(kind, {state: 0 for state in models.TASK_STATES})[state] = count
    stuck = [dict(zip(('id', 'kind', 'phone', 'claimed_at'), row)) for row in db.execute_sql(
        "SELECT t.id, t.kind, COALESCE(p.label, p.imsi), t.claimed_at FROM task t "
        "JOIN phone p ON p.id = t.claimed_by_id WHERE t.status = 'claimed' AND t.claimed_at < ? "
        'ORDER BY t.claimed_at LIMIT 20', (at - stuck_after,))]
    errors = db.execute_sql(
        'SELECT l.at, COALESCE(p.label, p.imsi, p.mac, l.imsi, l.macaddr), l.msg FROM log l '
        'LEFT JOIN phone p ON p.id = l.phone_id WHERE l.id > (SELECT COALESCE(MAX(id), 0) - 5000 '
        'FROM log) AND (%s) ORDER BY l.id DESC LIMIT 5'
        % ' OR '.join("l.msg LIKE '%%%s%%'" % word for word in ERROR_WORDS)).fetchall()
    return {
        'phones': dict(zip(('total', 'offline', 'unapproved', 'active', 'inactive'),
                           [value or 0 for value in phones])),
        'tasks': tasks,
        'stuck_tasks': [json_times(row, 'claimed_at') for row in stuck],
        'numbers': count_by("SELECT CASE WHEN phone_id IS NULL THEN 'free' ELSE 'bound' END, "
                            'COUNT(*) FROM number GROUP BY 1'),
        'profiles': count_by(
            "SELECT CASE WHEN state = 'reserved' AND reserved_until < ? THEN 'available' "
            'ELSE state END, COUNT(*) FROM profile GROUP BY 1', (at,)),
        'codes_last_hour': db.execute_sql('SELECT COUNT(*) FROM code WHERE received_at >= ?',
                                          (at - 3600,)).fetchone()[0],
        'codes_waiting': db.execute_sql(
            'SELECT COUNT(*) FROM code WHERE received_at >= ? AND code IS NOT NULL',
            (at - models.settings()['code_lifetime'] * 60,)).fetchone()[0],
        'comments': count_by('SELECT delete_state, COUNT(*) FROM comment GROUP BY 1'),
        'recent_errors': [{'at': iso_time(ts), 'phone': who, 'msg': msg} for ts, who, msg in errors],
    }


def print_status(data):
    p = data['phones']
    click.echo('phones    %d: %d active, %d inactive, %d offline, %d awaiting approval'
               % (p['total'], p['active'], p['inactive'], p['offline'], p['unapproved']))
    for kind in models.TASK_KINDS:
        states = data['tasks'].get(kind, {})
        click.echo('%-9s %s' % (kind.replace('comment_reply', 'c-reply'), ', '.join(
            '%d %s' % (states.get(state, 0), state) for state in models.TASK_STATES)))
    comments = data['comments']
    click.echo('comments  %d: %d to delete, %d deletion failed, %d deleted'
               % (sum(comments.values()), comments.get('ordered', 0), comments.get('failed', 0),
                  comments.get('deleted', 0)))
    numbers, profiles = data['numbers'], data['profiles']
    click.echo('numbers   %d free, %d bound' % (numbers.get('free', 0), numbers.get('bound', 0)))
    click.echo('profiles  %d available, %d reserved, %d used' % (
        profiles.get('available', 0), profiles.get('reserved', 0), profiles.get('used', 0)))
    click.echo('codes     %d received in the last hour, %d still valid for phones to fetch'
               % (data['codes_last_hour'], data['codes_waiting']))
    if data['stuck_tasks']:
        click.echo('stuck     ' + ', '.join('#%d %s on %s since %s' % (
            row['id'], row['kind'], row['phone'], row['claimed_at'][11:19]) for row in data['stuck_tasks']))
    for row in data['recent_errors']:
        click.echo('error     %s %s: %s' % (row['at'][:19].replace('T', ' '), row['phone'] or '-',
                                           clip(row['msg'], 60)))


@main.command()
@click.option('--json', 'as_json', is_flag=True, help='Print the numbers as one JSON object.')
@click.option('--watch', is_flag=True, help='Refresh the screen every few seconds until Ctrl-C.')
@click.option('--interval', default=3.0, show_default=True, type=click.FloatRange(0.5, 3600))
@with_db
def status(as_json, watch, interval):
    """One screen: phones, queues, numbers, profiles, codes, last errors.

    Example: xhs-server status --watch
    """
    if as_json:
        click.echo(json.dumps(status_data(), ensure_ascii=False, indent=1))
        return
    if not watch:
        print_status(status_data())
        return
    try:
        while True:
            data = status_data()
            click.clear()
            click.echo('xhs-server status  %s  (every %gs, Ctrl-C to stop)\n' % (show_time(now()), interval))
            print_status(data)
            time.sleep(interval)
    except KeyboardInterrupt:
        pass


# --------------------------------------------------------------------------
# phones
# --------------------------------------------------------------------------

@main.group()
def phones():
    """The phones (SIMs) that call the server.

    Example: xhs-server phones list
    """


def sim_option(name):
    def check(ctx, param, value):
        if value is not None and not re.fullmatch(r'[0-9A-Za-z]{5,32}', value):
            raise click.BadParameter('must be 5 to 32 letters or digits', param_hint=name)
        return value
    return check


@phones.command('add')
@click.option('--imsi', required=True, callback=sim_option('--imsi'))
@click.option('--iccid', required=True, callback=sim_option('--iccid'))
@click.option('--label', help='A short name for the phone, e.g. A-01.')
@click.option('--mac', help='The phone\'s Wi-Fi MAC address.')
@click.option('--type', 'phone_type', type=click.IntRange(1, 2), default=2, show_default=True,
              help='1 coverage checking, 2 publishing.')
@with_db
def phones_add(imsi, iccid, label, mac, phone_type):
    """Register a phone before its first request, so work can be queued for it.

    Example: xhs-server phones add --imsi 460011234567801 --iccid 89860112345678901201 --label A-01
    """
    from xhs_server import mac_value
    normal, valid = mac_value(mac)
    if not valid:
        raise click.BadParameter('%r is not a MAC address' % mac, param_hint='--mac')
    label = check_label(label)
    if models.find_phone_by_sim(imsi, iccid):
        raise click.ClickException('phone %s/%s is already registered' % (imsi, iccid))
    phone = Phone.create(imsi=imsi, iccid=iccid, label=label, mac=normal, phone_type=phone_type)
    done('added phone %s (id %d)' % (label or imsi, phone.id))


def check_label(label, phone_id=None):
    """A label that names one phone only: printable, on one line, not another phone's id/SIM/MAC."""
    if label is None:
        return None
    label = label.strip()
    if not label or not label.isprintable() or len(label) > 64:
        raise click.BadParameter('a label is 1 to 64 printable characters on one line', param_hint='--label')
    other = models.resolve_phone(label)
    if other is not None and other.id != phone_id:
        raise click.ClickException('label %r would also name phone %s (by its label, id, IMSI, ICCID '
                                   'or MAC)' % (label, other.name))
    return label


def phone_rows():
    at = now()
    numbers = {phone_id: number for number, phone_id in
               db.execute_sql('SELECT number, phone_id FROM number WHERE phone_id IS NOT NULL')}
    rows = []
    for phone in Phone.select().order_by(Phone.label.is_null(), Phone.label, Phone.id):
        rows.append({
            'label': phone.label, 'id': phone.id, 'imsi': phone.imsi, 'iccid': phone.iccid,
            'mac': phone.mac, 'type': phone.phone_type, 'account': phone.account_name,
            'xhs_id': phone.xhs_id, 'number': numbers.get(phone.id),
            'last_seen': phone.last_seen, 'active': models.is_active(phone.last_seen, at),
            'offline': phone.offline, 'approved': phone.approved,
            'rest_day': phone.rest_day, 'rest_night': phone.rest_night,
        })
    return rows


def yes_no(value):
    return 'yes' if value else 'no'


@phones.command('list')
@json_option
@with_db
def phones_list(as_json):
    """Every phone with its account, number, last activity and flags.

    Example: xhs-server phones list --json
    """
    rows = phone_rows()
    if as_json:
        rows = [json_times(row, 'last_seen') for row in rows]
    emit(rows, [('LABEL', 'label', None), ('ID', 'id', None), ('IMSI', 'imsi', None),
                ('ICCID', 'iccid', None), ('MAC', 'mac', None), ('TYPE', 'type', None),
                ('ACCOUNT', 'account', None), ('NUMBER', 'number', None),
                ('LAST ACTIVITY', 'last_seen', show_time), ('ACTIVE', 'active', yes_no),
                ('OFFLINE', 'offline', yes_no), ('APPROVED', 'approved', yes_no)], as_json)


@phones.command('set')
@click.argument('phone')
@click.option('--label')
@click.option('--offline/--online', default=None, help='Offline phones get no tasks and are told so.')
@click.option('--rest', type=click.IntRange(0, 1440), help='Rest minutes, day and night.')
@click.option('--rest-day', type=click.IntRange(0, 1440))
@click.option('--rest-night', type=click.IntRange(0, 1440))
@click.option('--approve', is_flag=True, help='Let a phone waiting for approval work.')
@click.option('--refresh-profile', is_flag=True, help='Ask the phone to report its account again.')
@with_db
def phones_set(phone, label, offline, rest, rest_day, rest_night, approve, refresh_profile):
    """Change one phone (named by label, id, imsi or iccid).

    Example: xhs-server phones set A-01 --offline --rest-night 180
    """
    target = find_phone(phone)
    label = check_label(label, target.id)
    changes = {'label': label, 'offline': offline, 'approved': True if approve else None,
               'refresh_profile': True if refresh_profile else None,
               'rest_day': rest_day if rest_day is not None else rest,
               'rest_night': rest_night if rest_night is not None else rest}
    changes = {key: value for key, value in changes.items() if value is not None}
    if not changes:
        raise click.UsageError('nothing to change: give at least one option')
    said = ['%s %s -> %s' % (key, getattr(target, key), value)
            for key, value in changes.items() if getattr(target, key) != value]
    Phone.update(changes).where(Phone.id == target.id).execute()
    done('phone %s: %s' % (target.name, ', '.join(said) or 'no change'))


@phones.command('history')
@click.argument('phone')
@click.option('--limit', default=50, show_default=True, type=LIMIT)
@json_option
@with_db
def phones_history(phone, limit, as_json):
    """When a phone went quiet and when it came back.

    Example: xhs-server phones history A-01
    """
    target = find_phone(phone)
    events = (models.PhoneEvent.select().where(models.PhoneEvent.phone == target.id)
              .order_by(models.PhoneEvent.at.desc(), models.PhoneEvent.id.desc()).limit(limit))
    rows = [{'at': event.at, 'event': event.event} for event in reversed(list(events))]
    if as_json:
        rows = [json_times(row, 'at') for row in rows]
    emit(rows, [('TIME', 'at', show_time), ('EVENT', 'event', None)], as_json)


# --------------------------------------------------------------------------
# Imports (numbers, profiles, tasks)
# --------------------------------------------------------------------------

def read_text(path):
    try:
        if path == '-':
            raw = sys.stdin.buffer.read()
        else:
            with open(path, 'rb') as handle:
                raw = handle.read()
    except OSError as error:
        raise click.ClickException('cannot read %s: %s' % (path, error.strerror or error)) from None
    try:
        return raw.decode('utf-8-sig')
    except UnicodeDecodeError as error:
        raise click.ClickException('cannot read %s: not UTF-8 text (byte %d)' % (path, error.start)) from None


csv.field_size_limit(64 * 1024 * 1024)
HEADER_CELL = re.compile(r'[a-z_]+')


def records(text, fields):
    """(line number, dict or reason) for each JSON line, or each CSV row (with a header
    of `fields`, or in their order). A file that is not CSV at all stops the import."""
    lines = text.splitlines()
    first = next((line.strip() for line in lines if line.strip()), '')
    if first.startswith('{'):
        yield from json_records(lines)
        return
    reader = csv.reader(io.StringIO(text, newline=''))
    header, line = None, 0
    try:
        for row in reader:
            start, line = line + 1, reader.line_num
            cells = [cell.strip() for cell in row]
            if not any(cells) or cells[0].startswith('#'):
                continue
            if header is None:
                header = csv_header(cells, fields)
                if header:
                    continue
                header = list(fields)
            if len(cells) > len(header):
                yield start, 'more columns than %s' % ', '.join(header)
                continue
            yield start, dict(zip(header, cells))
    except csv.Error as error:
        raise click.ClickException('line %d: %s; nothing imported' % (reader.line_num, error)) from None


def csv_header(cells, fields):
    """The first row's names when it is a header (all lowercase words), else None."""
    if not all(HEADER_CELL.fullmatch(cell) for cell in cells):
        return None
    unknown = [cell for cell in cells if cell not in fields]
    if unknown:
        raise click.ClickException('unknown column %s; the columns are %s; nothing imported'
                                   % (', '.join(unknown), ', '.join(fields)))
    return cells


def json_records(lines):
    for number, line in enumerate(lines, 1):
        if not line.strip() or line.lstrip().startswith('#'):
            continue
        try:
            value = json.loads(line)
        except (ValueError, RecursionError):
            value = None
        yield number, valid_json(value) if isinstance(value, dict) else 'not a JSON object'


def valid_json(value):
    """Strings in a JSON value with any lone surrogate (from a \\ud800 escape) made U+FFFD."""
    if isinstance(value, str):
        return models.valid_unicode(value)
    if isinstance(value, list):
        return [valid_json(item) for item in value]
    if isinstance(value, dict):
        return {key: valid_json(item) for key, item in value.items()}
    return value


def import_file(path, noun, fields, check, key, existing, insert, strict, prepare=None):
    """Import the good lines of a file in one transaction; report every skipped line.

    check(record) -> item or ValueError(reason); key(item) for duplicates;
    existing(keys) -> keys already stored; insert(items); prepare(item), if
    given, runs on each good item before the transaction (file copies belong
    outside it, so phones are not kept waiting).
    """
    rows = list(records(read_text(path), fields))
    good, invalid, duplicate = [], [], []
    seen = {}
    with click.progressbar(rows, label='reading %s' % path, file=sys.stderr,
                           hidden=len(rows) <= PROGRESS_FROM) as bar:
        for number, record in bar:
            try:
                if isinstance(record, str):
                    raise ValueError(record)
                item = check(record)
            except ValueError as error:
                invalid.append((number, str(error)))
                continue
            if key(item) in seen:
                duplicate.append((number, 'same as line %d' % seen[key(item)]))
                continue
            seen[key(item)] = number
            good.append((number, item))
    if strict and invalid:
        report(invalid, [])
        raise click.ClickException('%d bad line(s); nothing imported (--strict)' % len(invalid))
    if prepare:
        good = [(number, prepare(item)) for number, item in good]
    with db.immediate():
        stored = existing([key(item) for _, item in good])
        duplicate += [(number, 'already stored') for number, item in good if key(item) in stored]
        fresh = [item for _, item in good if key(item) not in stored]
        insert(fresh)
    report(invalid, duplicate)
    done('imported %d %s from %s; skipped %d (%d invalid, %d duplicate)' % (
        len(fresh), noun, path, len(invalid) + len(duplicate), len(invalid), len(duplicate)))


def report(invalid, duplicate):
    for number, reason in sorted(invalid + [(n, 'duplicate: ' + r) for n, r in duplicate]):
        click.echo('line %d: skipped, %s' % (number, reason), err=True)


def in_chunks(values, size=500):
    values = list(values)
    for start in range(0, len(values), size):
        yield values[start:start + size]


def stored_values(field, values):
    found = set()
    for chunk in in_chunks(values):
        found.update(value for (value,) in field.model.select(field).where(field.in_(chunk)).tuples())
    return found


def insert_rows(model, items):
    for chunk in in_chunks(items, 200):
        model.insert_many(chunk).execute()


# --------------------------------------------------------------------------
# numbers
# --------------------------------------------------------------------------

@main.group()
def numbers():
    """The pool of phone numbers handed to SIMs by get_phone_number.

    Example: xhs-server numbers import numbers.txt
    """


def check_number(record):
    number = models.normalize_number(record.get('phone_number', ''))
    if number is None:
        raise ValueError('not a phone number: %r' % record.get('phone_number', ''))
    iccid = (record.get('iccid') or '').strip() or None
    if iccid is not None and not re.fullmatch(r'[0-9A-Za-z]{5,32}', iccid):
        raise ValueError('not an ICCID: %r' % iccid)
    return {'number': number, 'iccid': iccid, 'created_at': now()}


@numbers.command('import')
@click.argument('file')
@click.option('--strict', is_flag=True, help='Import nothing if any line is bad.')
@with_db
def numbers_import(file, strict):
    """Import numbers: one a line, or CSV phone_number[,iccid] (iccid pre-assigns it to that SIM).

    Example: xhs-server numbers import numbers.txt
    """
    import_file(file, 'numbers', ('phone_number', 'iccid'), check_number,
                lambda item: item['number'], lambda keys: stored_values(Number.number, keys),
                lambda items: insert_rows(Number, items), strict)


@numbers.command('list')
@click.option('--free', 'which', flag_value='free', help='Only numbers not bound to a SIM.')
@click.option('--bound', 'which', flag_value='bound', help='Only numbers bound to a SIM.')
@json_option
@with_db
def numbers_list(which, as_json):
    """Numbers with the SIM each is bound to (or pre-assigned to).

    Example: xhs-server numbers list --free
    """
    query = (Number.select(Number, Phone).join(Phone, peewee.JOIN.LEFT_OUTER, on=Number.phone == Phone.id)
             .order_by(Number.id))
    if which == 'free':
        query = query.where(Number.phone.is_null())
    elif which == 'bound':
        query = query.where(Number.phone.is_null(False))
    rows = [{'number': n.number, 'preassigned_iccid': n.iccid,
             'phone': n.phone.name if n.phone_id else None, 'bound_at': n.bound_at} for n in query]
    if as_json:
        rows = [json_times(row, 'bound_at') for row in rows]
    emit(rows, [('NUMBER', 'number', None), ('PHONE', 'phone', None),
                ('BOUND', 'bound_at', show_time), ('PRE-ASSIGNED ICCID', 'preassigned_iccid', None)],
         as_json)


# --------------------------------------------------------------------------
# codes
# --------------------------------------------------------------------------

@main.group()
def codes():
    """Verification codes: received SMS and codes typed in by the operator.

    Example: xhs-server codes list
    """


@codes.command('add')
@click.argument('phone_number')
@click.argument('code')
@with_db
def codes_add(phone_number, code):
    """Enter a code received now for one of the studio's numbers.

    Example: xhs-server codes add 13900000001 604213
    """
    number = models.normalize_number(phone_number)
    if number is None:
        raise click.BadParameter('%r is not a phone number' % phone_number, param_hint='PHONE_NUMBER')
    if not re.fullmatch(r'\d{4,8}', code):
        raise click.BadParameter('a code is 4 to 8 digits', param_hint='CODE')
    models.add_code(number, '', code=code, source='operator')
    done('code added for %s' % mask_number(number), secret=code)


@codes.command('list')
@click.option('--number', help='Only this number.')
@click.option('--limit', default=50, show_default=True, type=LIMIT)
@click.option('--reveal', is_flag=True, help='Show numbers and codes unmasked.')
@json_option
@with_db
def codes_list(number, limit, reveal, as_json):
    """Recent codes and SMS, newest first (masked unless --reveal).

    Example: xhs-server codes list --number 13900000001 --reveal
    """
    query = Code.select().order_by(Code.received_at.desc(), Code.id.desc()).limit(limit)
    if number:
        normal = models.normalize_number(number)
        if normal is None:
            raise click.BadParameter('%r is not a phone number' % number, param_hint='--number')
        query = query.where(Code.number == normal)
    rows = []
    for item in query:
        text, code = item.content, item.code or ''
        if not reveal:
            text = models.CODE_RE.sub(lambda m: mask_code(m.group()), text)
        rows.append({'received_at': item.received_at, 'number': item.number if reveal else mask_number(item.number),
                     'code': code if reveal else mask_code(code), 'sender': item.sender,
                     'source': item.source, 'sms': text})
    if as_json:
        rows = [json_times(row, 'received_at') for row in rows]
    emit(rows, [('RECEIVED', 'received_at', show_time), ('NUMBER', 'number', None),
                ('CODE', 'code', None), ('FROM', 'sender', None), ('SOURCE', 'source', None),
                ('SMS', 'sms', clip)], as_json)


# --------------------------------------------------------------------------
# profiles
# --------------------------------------------------------------------------

PROFILE_FIELDS = ('gender_id', 'gender', 'head_portrait', 'birthday', 'name', 'platform')
GENDERS = {1: '男', 2: '女'}


def check_profile(record):
    name = str(record.get('name') or '').strip()
    if not name:
        raise ValueError('no name')
    gender = str(record.get('gender') or '').strip()
    gender_id = str(record.get('gender_id') or '').strip()
    if gender_id not in ('1', '2'):
        inferred = {'男': '1', '女': '2'}.get(gender)
        if inferred is None:
            raise ValueError('gender_id must be 1 (男) or 2 (女)')
        gender_id = inferred
    birthday = str(record.get('birthday') or '').strip()
    try:
        datetime.date.fromisoformat(birthday)
    except ValueError:
        raise ValueError('birthday must be YYYY-MM-DD: %r' % birthday) from None
    platform = str(record.get('platform') or '1').strip()
    if not re.fullmatch(r'\d{1,9}', platform):
        raise ValueError('platform must be a number: %r' % platform)
    return {'gender_id': int(gender_id), 'gender': gender or GENDERS[int(gender_id)],
            'head_portrait': str(record.get('head_portrait') or '').strip(), 'birthday': birthday,
            'name': name, 'platform': int(platform), 'created_at': now()}


@main.group()
def profiles():
    """Queued new-account profiles, handed out by get_xhs_unregistered_information.

    Example: xhs-server profiles import profiles.csv
    """


@profiles.command('import')
@click.argument('file')
@click.option('--strict', is_flag=True, help='Import nothing if any line is bad.')
@with_db
def profiles_import(file, strict):
    """Import profiles from CSV (header: gender_id,gender,head_portrait,birthday,name,platform) or JSON lines.

    A name already queued counts as a duplicate.

    Example: xhs-server profiles import profiles.csv
    """
    import_file(file, 'profiles', PROFILE_FIELDS, check_profile, lambda item: item['name'],
                lambda keys: stored_values(Profile.name, keys),
                lambda items: insert_rows(Profile, items), strict)


@profiles.command('list')
@click.option('--available', is_flag=True, help='Only profiles that can be handed out now.')
@json_option
@with_db
def profiles_list(available, as_json):
    """The profile queue with each profile's state.

    Example: xhs-server profiles list --available
    """
    at = now()
    query = Profile.select().order_by(Profile.id)
    rows = []
    for item in query:
        state = item.state
        if state == models.RESERVED and item.reserved_until < at:
            state = models.AVAILABLE
        if available and state != models.AVAILABLE:
            continue
        holder = item.used_by_id if state == models.USED else item.reserved_by_id
        rows.append({'id': item.id, 'name': item.name, 'gender': item.gender, 'birthday': item.birthday,
                     'platform': item.platform, 'state': state,
                     'phone': models.phone_label(holder) if holder and state != models.AVAILABLE else None,
                     'head_portrait': item.head_portrait})
    emit(rows, [('ID', 'id', None), ('NAME', 'name', None), ('GENDER', 'gender', None),
                ('BIRTHDAY', 'birthday', None), ('STATE', 'state', None), ('PHONE', 'phone', None)],
         as_json)


# --------------------------------------------------------------------------
# tasks
# --------------------------------------------------------------------------

RELEASE_FIELDS = ('content', 'title', 'images', 'topics', 'platform', 'phone', 'at', 'priority')


@main.group()
def tasks():
    """Release (publish) tasks and DM replies for the phones.

    Example: xhs-server tasks list --status claimed
    """


def image_ref(ref):
    """An http(s) URL as given, or the absolute path of a whole local image (checked, not yet stored)."""
    if re.match(r'^https?://\S+$', ref):
        return ref
    try:
        with open(ref, 'rb') as handle:
            data = handle.read()
    except OSError as error:
        raise ValueError('image %s: %s' % (ref, error.strerror or error)) from None
    if models.image_type(data) is None:
        raise ValueError('image %s is not a PNG, JPEG, WebP or GIF file' % ref)
    if not models.image_complete(data):
        raise ValueError('image %s is cut off (its end is missing)' % ref)
    return os.path.abspath(ref)


def store_images(item):
    """Copy a task's local images into the media folder ("media:<name>"); URLs stay."""
    refs = json.loads(item['images'] or '[]')
    stored = []
    for ref in refs:
        if ref.startswith('/'):
            with open(ref, 'rb') as handle:
                ref = 'media:' + models.store_image(handle.read(), keep=True)
        stored.append(ref)
    return dict(item, images=json.dumps(stored) if stored else None)


def as_list(value):
    """A list from a JSON array, a '|'-separated string, or a list."""
    if value in (None, ''):
        return []
    if isinstance(value, list):
        return [str(item).strip() for item in value if str(item).strip()]
    text = str(value).strip()
    if text.startswith('['):
        try:
            return as_list(json.loads(text))
        except ValueError:
            raise ValueError('not a JSON list: %r' % text) from None
    return [item.strip() for item in text.split('|') if item.strip()]


def release_item(record):
    """A release task row from import fields; ValueError naming what is wrong."""
    content = str(record.get('content') or '').strip()
    if not content:
        raise ValueError('no content')
    item = {'kind': models.RELEASE, 'content': content, 'created_at': now(),
            'title': str(record.get('title') or '').strip() or None,
            'topics': json.dumps(as_list(record.get('topics')), ensure_ascii=False) or None,
            'target_phone': None, 'target_account': None, 'run_at': 0, 'priority': 0, 'platform': 1}
    item['images'] = json.dumps([image_ref(ref) for ref in as_list(record.get('images'))])
    for key in ('platform', 'priority'):
        value = str(record.get(key) if record.get(key) is not None else '').strip()
        if value:
            if not re.fullmatch(r'-?\d{1,9}', value):
                raise ValueError('%s must be a whole number of at most 9 digits: %r' % (key, value))
            item[key] = int(value)
    phone = str(record.get('phone') or '').strip()
    if phone:
        found = models.resolve_phone(phone)
        if found is None:
            raise ValueError('no phone %r (register it with "phones add")' % phone)
        item['target_phone'] = found.id
    account = str(record.get('account') or '').strip()
    if account:
        item['target_account'], item['target_phone'] = account, None
    at = str(record.get('at') or '').strip()
    if at:
        try:
            item['run_at'] = parse_when(at, 'at')
        except click.BadParameter as error:
            raise ValueError(error.message) from None
    for key in ('images', 'topics'):
        if item[key] == '[]':
            item[key] = None
    return item


def release_key(item):
    return (item['content'], item['title'], item['target_phone'], item['target_account'])


def stored_release_keys(keys):
    wanted = set(keys)
    found = set()
    query = Task.select(Task.content, Task.title, Task.target_phone, Task.target_account).where(
        (Task.kind == models.RELEASE) & (Task.status != models.CANCELLED))
    for chunk in in_chunks({key[0] for key in wanted}):
        for row in query.where(Task.content.in_(chunk)).tuples():
            if row in wanted:
                found.add(row)
    return found


@tasks.command('add-release')
@click.option('--content', required=True, help='The note text, verbatim.')
@click.option('--title')
@click.option('--image', 'images', multiple=True, metavar='FILE_OR_URL',
              help='An image (repeatable): a local file is copied into the media folder.')
@click.option('--topic', 'topics', multiple=True, help='A topic (repeatable).')
@click.option('--platform', type=NUMBER, default=1, show_default=True)
@click.option('--phone', help='Only this phone may publish it.')
@click.option('--account', help='Only the phone holding this Xiaohongshu id may publish it.')
@click.option('--at', 'at', help='Not before this local time ("2026-12-24 18:00" or "+2h").')
@click.option('--priority', type=NUMBER, default=0, show_default=True, help='Higher goes first.')
@with_db
def tasks_add_release(content, title, images, topics, platform, phone, account, at, priority):
    """Queue a note to publish; prints its id.

    Example: xhs-server tasks add-release --content "秋天的第一杯奶茶" --image cup.jpg --phone A-01
    """
    if phone and account:
        raise click.UsageError('give --phone or --account, not both')
    if phone:
        find_phone(phone)
    if at:
        parse_when(at, '--at')
    try:
        item = release_item({'content': content, 'title': title, 'images': list(images),
                             'topics': list(topics), 'platform': str(platform), 'phone': phone,
                             'account': account, 'at': at, 'priority': str(priority)})
    except ValueError as error:
        raise click.ClickException(str(error)) from None
    task_id = Task.insert(store_images(item)).execute()
    done('release task %d queued%s' % (task_id, ' for %s' % (phone or account) if phone or account else ''))


@tasks.command('import')
@click.argument('file')
@click.option('--strict', is_flag=True, help='Import nothing if any line is bad.')
@with_db
def tasks_import(file, strict):
    """Queue many release tasks from CSV (header of: content,title,images,topics,platform,phone,at,priority) or JSON lines.

    In CSV, images and topics are separated by "|". A task identical to one
    already queued is a duplicate.

    Example: xhs-server tasks import release.jsonl
    """
    import_file(file, 'release tasks', RELEASE_FIELDS + ('account',), release_item, release_key,
                stored_release_keys, lambda items: insert_rows(Task, items), strict, store_images)


@tasks.command('add-reply')
@click.option('--phone', required=True, help='The phone that will send it.')
@click.option('--name', required=True, help='The DM counterpart, as the phone sees the name.')
@click.option('--msg', required=True, help='The reply text.')
@click.option('--platform', type=NUMBER, default=1, show_default=True)
@with_db
def tasks_add_reply(phone, name, msg, platform):
    """Queue a DM reply for a phone; prints its id.

    Example: xhs-server tasks add-reply --phone A-01 --name 路人甲 --msg "您好，已收到～"
    """
    target = find_phone(phone)
    if not name.strip() or not msg.strip():
        raise click.BadParameter('must not be empty', param_hint='--name/--msg')
    task_id = Task.insert(kind=models.REPLY, target_phone=target.id, name=name.strip(),
                          content=msg.strip(), platform=platform, created_at=now()).execute()
    done('reply task %d queued for %s' % (task_id, target.name))


def task_rows(kind, status_, phone, limit):
    Claimer = Phone.alias()
    Target = Phone.alias()
    query = (Task.select(Task, Claimer.label, Claimer.imsi, Target.label, Target.imsi)
             .join_from(Task, Claimer, peewee.JOIN.LEFT_OUTER, on=(Task.claimed_by == Claimer.id))
             .join_from(Task, Target, peewee.JOIN.LEFT_OUTER, on=(Task.target_phone == Target.id))
             .order_by(Task.id.desc()).limit(limit).tuples())
    if kind:
        query = query.where(Task.kind == kind)
    if status_:
        query = query.where(Task.status == status_)
    if phone:
        target = find_phone(phone)
        query = query.where((Task.claimed_by == target.id) | (Task.target_phone == target.id))
    names = [field.name for field in Task._meta.sorted_fields]
    rows = []
    for values in query:
        task = dict(zip(names, values))
        rows.append({
            'id': task['id'], 'kind': task['kind'], 'status': task['status'],
            'phone': values[-4] or values[-3], 'target': values[-2] or values[-1] or task['target_account'],
            'priority': task['priority'], 'run_at': task['run_at'] or None,
            'claimed_at': task['claimed_at'], 'done_at': task['done_at'],
            'result_url': task['result_url'], 'name': task['name'], 'title': task['title'],
            'content': task['content'], 'comment_id': task['comment'],
        })
    rows.reverse()
    return rows


@tasks.command('list')
@click.option('--kind', type=click.Choice(['release', 'reply', 'comment_reply']))
@click.option('--status', 'status_', type=click.Choice(models.TASK_STATES))
@click.option('--phone', help='Tasks claimed by or meant for this phone.')
@click.option('--limit', default=100, show_default=True, type=LIMIT)
@json_option
@with_db
def tasks_list(kind, status_, phone, limit, as_json):
    """Tasks (newest last) with state, phone, claim time and result URL.

    Example: xhs-server tasks list --kind release --status claimed
    """
    rows = task_rows(kind, status_, phone, limit)
    if as_json:
        rows = [json_times(row, 'run_at', 'claimed_at', 'done_at') for row in rows]
    emit(rows, [('ID', 'id', None), ('KIND', 'kind', None), ('STATUS', 'status', None),
                ('PHONE', 'phone', None), ('FOR', 'target', None), ('CLAIMED', 'claimed_at', show_time),
                ('DONE', 'done_at', show_time), ('URL', 'result_url', None), ('CONTENT', 'content', clip)],
         as_json)


def operator_move(task_id, move, verb):
    try:
        task = move(task_id)
    except NotFound:
        raise click.ClickException('no task %d' % task_id) from None
    except Conflict as error:
        raise click.ClickException(str(error)) from None
    done('%s task %d %s (was %s)' % (task['kind'], task_id, verb, task['status']))


@tasks.command('requeue')
@click.argument('task_id', type=ID)
@with_db
def tasks_requeue(task_id):
    """Put a handed-out (or cancelled) task back in the queue for any phone.

    Example: xhs-server tasks requeue 12
    """
    operator_move(task_id, models.requeue_task, 'requeued')


@tasks.command('cancel')
@click.argument('task_id', type=ID)
@with_db
def tasks_cancel(task_id):
    """Withdraw a task that is not done yet.

    Example: xhs-server tasks cancel 12
    """
    operator_move(task_id, models.cancel_task, 'cancelled')


# --------------------------------------------------------------------------
# comments
# --------------------------------------------------------------------------

@main.group()
def comments():
    """Comments the phones reported under the accounts' notes, and their moderation.

    Example: xhs-server comments list --status failed
    """


def comment_rows(state, phone, limit):
    query = Comment.select().order_by(Comment.id.desc()).limit(limit)
    if state in models.DELETE_STATES:
        query = query.where(Comment.delete_state == state)
    if phone:
        query = query.where(Comment.phone == find_phone(phone).id)
    comments_ = list(query)
    replies = {}
    for task in Task.select().where(Task.comment.in_([c.id for c in comments_])).order_by(Task.id):
        replies.setdefault(task.comment_id, []).append(task)
    shots = {}
    rows = []
    for comment in reversed(comments_):
        mine = replies.get(comment.id, [])
        last = mine[-1] if mine else None
        row = {
            'id': comment.id, 'phone': shots.setdefault(comment.phone_id, models.phone_label(comment.phone_id)),
            'nick_name': comment.nick_name, 'content': comment.content, 'note_id': comment.note_id,
            'screenshot': comment.screenshots_address, 'article': comment.article_picture_address,
            'created_at': comment.created_at,
            'reply': last.status if last else None, 'reply_text': last.content if last else None,
            'replies': len(mine), 'delete': comment.delete_state,
        }
        if state == 'replied' and row['reply'] != models.DONE or state == 'unanswered' and mine:
            continue
        rows.append(row)
    return rows


@comments.command('list')
@click.option('--status', 'state', type=click.Choice(('unanswered', 'replied') + models.DELETE_STATES),
              help='Deletion state (none, ordered, deleted, failed), or unanswered / replied.')
@click.option('--phone', help='Comments reported by this phone.')
@click.option('--limit', default=100, show_default=True, type=LIMIT)
@json_option
@with_db
def comments_list(state, phone, limit, as_json):
    """Reported comments (newest last) with their reply and delete state.

    Example: xhs-server comments list --status failed
    """
    rows = comment_rows(state, phone, limit)
    if as_json:
        rows = [json_times(row, 'created_at') for row in rows]
    emit(rows, [('ID', 'id', None), ('PHONE', 'phone', None), ('BY', 'nick_name', None),
                ('COMMENT', 'content', clip), ('NOTE', 'note_id', None), ('REPLY', 'reply', None),
                ('DELETE', 'delete', None), ('SCREENSHOT', 'screenshot', None)], as_json)


@comments.command('reply')
@click.argument('comment_id', type=ID)
@click.argument('text')
@with_db
def comments_reply(comment_id, text):
    """Answer a comment: the phone that reported it will post TEXT as a reply.

    Example: xhs-server comments reply 7 "谢谢喜欢～ 链接在主页"
    """
    if not text.strip():
        raise click.BadParameter('must not be empty', param_hint='TEXT')
    try:
        task_id = models.order_reply(comment_id, text.strip())
    except NotFound:
        raise click.ClickException('no comment %d' % comment_id) from None
    done('reply task %d queued for comment %d' % (task_id, comment_id))


@comments.command('delete')
@click.argument('comment_id', type=ID)
@with_db
def comments_delete(comment_id):
    """Order a comment deleted (again, after a failed deletion).

    Example: xhs-server comments delete 7
    """
    try:
        changed = models.order_delete(comment_id)
    except NotFound:
        raise click.ClickException('no comment %d' % comment_id) from None
    except Conflict as error:
        raise click.ClickException(str(error)) from None
    done('comment %d %s' % (comment_id, 'ordered deleted' if changed else 'was already ordered deleted'))


# --------------------------------------------------------------------------
# logs
# --------------------------------------------------------------------------

def log_query(phone, since, grep, after_id=0):
    Who = Phone.alias()
    query = (Log.select(Log.id, Log.at, Log.msg, Log.remote, Log.imsi, Log.macaddr, Who.label, Who.imsi,
                        Who.mac)
             .join(Who, peewee.JOIN.LEFT_OUTER, on=(Log.phone == Who.id)).where(Log.id > after_id))
    if phone:
        query = query.where(Log.phone == find_phone(phone).id)
    if since is not None:
        query = query.where(Log.at >= since)
    if grep:
        query = query.where(Log.msg.contains(grep))
    return query


def log_row(values):
    log_id, at, msg, remote, imsi, mac, label, phone_imsi, phone_mac = values
    # The phone's name when the line is a known phone's, else what the line came with.
    return {'id': log_id, 'at': at, 'phone': label or phone_imsi or phone_mac or imsi or mac or '-',
            'remote': remote, 'msg': msg}


def print_log(row, as_json):
    if as_json:
        click.echo(json.dumps(json_times(row, 'at'), ensure_ascii=False))
    else:
        click.echo('%s  %-12s %s' % (show_time(row['at']), row['phone'], row['msg']))


@main.group(invoke_without_command=True)
@click.option('--phone', help='Only this phone\'s lines.')
@click.option('--since', help='From this local time, or a span ago ("2h", "7d").')
@click.option('--grep', help='Only lines containing this text.')
@click.option('--limit', default=100, show_default=True, type=LIMIT)
@click.option('--follow', '-f', is_flag=True, help='Keep printing new lines until Ctrl-C.')
@json_option
@click.pass_context
def logs(ctx, phone, since, grep, limit, follow, as_json):
    """Phone logs, newest last (the last --limit lines).

    Example: xhs-server logs --phone A-01 --since 2h --follow
    """
    if ctx.invoked_subcommand:
        return
    open_db(ctx)
    since_ts = parse_when(since, '--since') if since else None
    query = log_query(phone, since_ts, grep)
    rows = [log_row(values) for values in query.order_by(Log.id.desc()).limit(limit).tuples()][::-1]
    if as_json and not follow:
        emit([json_times(row, 'at') for row in rows], [], True)
        return
    for row in rows:
        print_log(row, as_json)
    last = rows[-1]['id'] if rows else db.execute_sql('SELECT COALESCE(MAX(id), 0) FROM log').fetchone()[0]
    try:
        while follow:
            time.sleep(1)
            for values in log_query(phone, since_ts, grep, last).order_by(Log.id).limit(1000).tuples():
                row = log_row(values)
                print_log(row, as_json)
                last = row['id']
    except KeyboardInterrupt:
        pass


@logs.command('prune')
@click.option('--before', required=True, help='Delete lines older than this ("2026-11-01", "30d").')
@with_db
def logs_prune(before):
    """Delete old log lines in small batches (phones are not blocked); says how many.

    Example: xhs-server logs prune --before 30d
    """
    cutoff = parse_when(before, '--before')
    total = db.execute_sql('SELECT COUNT(*) FROM log WHERE at < ?', (cutoff,)).fetchone()[0]
    deleted = with_progress('pruning logs', total, models.prune_logs(cutoff))
    done('deleted %d log lines before %s' % (deleted, show_time(cutoff)))


def with_progress(label, total, batches):
    """Run a batched job (a generator of counts), with a progress bar when it is big."""
    finished = 0
    with click.progressbar(length=total, label=label, file=sys.stderr,
                           hidden=total <= PROGRESS_FROM) as bar:
        for count in batches:
            finished += count
            bar.update(count)
    return finished


@main.group()
def screenshots():
    """Screenshots the phones uploaded (DM and article screenshots).

    Example: xhs-server screenshots prune --before 30d
    """


@screenshots.command('prune')
@click.option('--before', help='Delete screenshots taken before this ("30d", "2026-11-01"); '
                               'default: the screenshot_retention_days setting.')
@with_db
def screenshots_prune(before):
    """Delete old screenshots and their files in small batches; says how many.

    The server applies screenshot_retention_days by itself every hour; this runs it now.

    Example: xhs-server screenshots prune --before 30d
    """
    if before:
        cutoff = parse_when(before, '--before')
    else:
        days = models.settings()['screenshot_retention_days']
        if not days:
            raise click.UsageError('give --before, or set screenshot_retention_days')
        cutoff = now() - days * 86400
    total = db.execute_sql('SELECT COUNT(*) FROM screenshot WHERE created_at < ?', (cutoff,)).fetchone()[0]
    deleted = with_progress('pruning screenshots', total, models.prune_screenshots(cutoff))
    done('deleted %d screenshots taken before %s' % (deleted, show_time(cutoff)))


# --------------------------------------------------------------------------
# settings, audit, backup
# --------------------------------------------------------------------------

@main.command('settings')
@click.argument('key', required=False)
@click.argument('value', required=False)
@json_option
@with_db
def settings_cmd(key, value, as_json):
    """Show the server's tunables, or one, or set one (the server picks it up within seconds).

    Example: xhs-server settings rest_night 180
    """
    current = models.settings(fresh=True)
    if key is not None and key not in models.SETTINGS:
        raise click.BadParameter('unknown setting %r; one of: %s' % (key, ', '.join(models.SETTINGS)),
                                 param_hint='KEY')
    if value is not None:
        try:
            parsed = models.set_setting(key, value)
        except ValueError as error:
            raise click.BadParameter(str(error), param_hint='VALUE') from None
        done('%s: %s -> %s' % (key, current[key], parsed))
        return
    rows = [{'key': name, 'value': current[name], 'default': default, 'meaning': meaning}
            for name, (default, meaning) in models.SETTINGS.items() if key in (None, name)]
    if key and not as_json:
        click.echo(current[key])
        return
    emit(rows, [('KEY', 'key', None), ('VALUE', 'value', None), ('DEFAULT', 'default', None),
                ('MEANING', 'meaning', None)], as_json)


@main.command('audit')
@click.option('--since', help='From this local time, or a span ago ("7d").')
@click.option('--limit', default=100, show_default=True, type=LIMIT)
@json_option
@with_db
def audit_cmd(since, limit, as_json):
    """Every CLI command that changed data: when, who, what (newest last).

    Example: xhs-server audit --since 7d
    """
    query = Audit.select().order_by(Audit.id.desc()).limit(limit)
    if since:
        query = query.where(Audit.at >= parse_when(since, '--since'))
    rows = [{'at': item.at, 'user': item.user, 'command': item.command, 'change': item.change}
            for item in reversed(list(query))]
    if as_json:
        rows = [json_times(row, 'at') for row in rows]
    emit(rows, [('TIME', 'at', show_time), ('USER', 'user', None), ('CHANGE', 'change', None),
                ('COMMAND', 'command', None)], as_json)


def copy_database(path):
    """SQLite's online backup of the live database into `path`; returns its integrity check."""
    target = sqlite3.connect(path)
    try:
        with click.progressbar(length=100, label='backing up', file=sys.stderr) as bar:
            def progress(status, remaining, total):
                bar.update(int(100 * (total - remaining) / max(total, 1)) - bar.pos)
            db.connection().backup(target, pages=1024, progress=progress)
        return target.execute('PRAGMA integrity_check').fetchone()[0]
    finally:
        target.close()


@main.command()
@click.argument('dest')
@click.option('--force', is_flag=True, help='Overwrite DEST if it exists.')
@with_db
def backup(dest, force):
    """Copy the database consistently while the server runs (SQLite online backup).

    The media folder (stored images) is plain files: copy it with rsync or cp.

    Example: xhs-server backup /mnt/backup/xhs-2026-12-03.db
    """
    dest = os.path.abspath(dest)
    if dest == db.database:
        raise click.BadParameter('that is the live database', param_hint='DEST')
    if os.path.exists(dest) and not force:
        raise click.ClickException('%s exists; use --force to overwrite it' % dest)
    if not os.path.isdir(os.path.dirname(dest)):
        raise click.ClickException('no folder %s' % os.path.dirname(dest))
    tmp = dest + '.partial'
    try:
        check = copy_database(tmp)
        if check != 'ok':
            raise click.ClickException('the copy failed its integrity check: %s' % check)
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    click.echo('backed up %s to %s (%d bytes)' % (db.database, dest, os.path.getsize(dest)))


def add_simulator():
    from simulate import simulate
    main.add_command(simulate)


add_simulator()

if __name__ == '__main__':
    main()
