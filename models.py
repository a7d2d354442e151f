"""Database models and the queue operations of xhs-server.

One SQLite file (WAL, busy timeout) holds everything; stored images live in a
`media/` folder beside it. Every operation that hands something out (a task, a
phone number, a profile) is a single conditional statement or an IMMEDIATE
transaction, so several server threads, several processes and the operator's
CLI can work on the same file at once without Python locks.

Times are stored as epoch seconds (REAL) and shown in server local time.
"""
import errno
import hashlib
import json
import mmap
import os
import queue
import re
import secrets
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress

import peewee
from peewee import (
    BooleanField, Check, CharField, DeferredForeignKey, FloatField, ForeignKeyField, IntegerField,
    IntegrityError, Model, OperationalError, SqliteDatabase, TextField,
)

# --------------------------------------------------------------------------
# Constants
# --------------------------------------------------------------------------

PENDING, CLAIMED, DONE, CANCELLED = 'pending', 'claimed', 'done', 'cancelled'
TASK_STATES = (PENDING, CLAIMED, DONE, CANCELLED)

RELEASE, REPLY, COMMENT_REPLY = 'release', 'reply', 'comment_reply'
TASK_KINDS = (RELEASE, REPLY, COMMENT_REPLY)

# A comment's deletion: not asked, ordered by the operator, done, or failed on
# the phone (out of the queue until ordered again).
DEL_NONE, DEL_ORDERED, DEL_DONE, DEL_FAILED = 'none', 'ordered', 'deleted', 'failed'
DELETE_STATES = (DEL_NONE, DEL_ORDERED, DEL_DONE, DEL_FAILED)

AVAILABLE, RESERVED, USED = 'available', 'reserved', 'used'

SCREENSHOT_KINDS = ('dm', 'article')

# name -> (default, meaning). Values are ints unless the default is a str.
SETTINGS = {
    'rest_day': (20, 'rest minutes a phone is told from day_start to night_start'),
    'rest_night': (120, 'rest minutes a phone is told at night'),
    'day_start': ('09:00', 'local time the day rest value starts'),
    'night_start': ('22:00', 'local time the night rest value starts'),
    'activity_window': (5, 'minutes without a request before a phone counts as inactive'),
    'code_lifetime': (5, 'minutes a received verification code is handed out'),
    'reservation_window': (30, 'minutes a handed-out new-account profile stays reserved'),
    'max_body_mb': (32, 'largest request body in MB (larger: 413)'),
    'max_image_mb': (10, 'largest decoded image in MB (larger: 413)'),
    'max_images': (10, 'most images in one save_screenshots call'),
    'screenshot_retention_days': (0, 'days screenshots are kept (0: forever)'),
    'stuck_minutes': (60, 'minutes a handed-out task may stay unfinished before it is flagged'),
    'alert_webhook': ('', 'group-robot URL (WeCom, DingTalk, Feishu) that alerts are posted to'),
    'alert_every': (30, 'minutes between two alerts of one kind about one phone'),
}

ACTIVITY_STAMP_SECONDS = 10  # last-activity writes are coalesced to one per this

WRITES = ('INSERT', 'UPDATE', 'DELETE', 'REPLAC')
# peewee's mapping of sqlite3 errors to its own (IntegrityError, OperationalError...).
SQL_ERRORS = getattr(peewee, '__exception_wrapper__')


class Database(SqliteDatabase):
    """SQLite whose writing threads take turns at one in-process gate first.

    SQLite's busy handler polls with growing sleeps and is not fair: with dozens
    of threads writing, a waiting writer can starve past the busy timeout while
    newcomers keep winning the lock. So threads of one process queue on a
    reentrant lock (with the same timeout) before they write. Correctness never
    depends on it: every claim is still one atomic statement or an IMMEDIATE
    transaction, and other processes (the CLI) meet SQLite's own lock.
    """
    gate = threading.RLock()

    def execute_sql(self, sql, params=None):
        if sql[:6].upper() not in WRITES:
            return self.run(sql, params)
        with self.write_turn():
            cursor = self.run(sql, params)
        for copy in copies_of(sql):
            self.after_commit(copy.drop)   # at once outside a transaction
        return cursor

    def run(self, sql, params):
        """One statement on this thread's connection, without peewee's per-query
        logging and hooks (a tenth of a poll's time went there)."""
        with SQL_ERRORS:
            return self.connection().execute(sql, params or ())

    @contextmanager
    def write_turn(self):
        if not self.gate.acquire(timeout=self._timeout):
            raise OperationalError('database is locked (no write turn within the busy timeout)')
        try:
            yield
        finally:
            self.gate.release()

    @contextmanager
    def immediate(self):
        """A write transaction that holds SQLite's write lock from its first statement."""
        with self.write_turn():
            try:
                with self.atomic('IMMEDIATE'):
                    yield
            except OperationalError as error:
                # A COMMIT that fails (a full disk) is rolled back by SQLite itself;
                # peewee's ROLLBACK then fails too, and would hide why.
                cause = error
                while cause is not None and (not isinstance(cause, OperationalError)
                                             or 'no transaction is active' in str(cause)):
                    cause = cause.__context__
                if cause is None or cause is error:
                    raise
                raise cause from None


db = Database(None, timeout=5)
_state = {'media': None, 'path': None}


# --------------------------------------------------------------------------
# Setup
# --------------------------------------------------------------------------

def init_db(path, media_dir=None, busy_timeout=5.0, synchronous='full'):
    """Open (creating when needed) the database at `path` and its media folder.

    `synchronous` stays 'full' in production: every answer a phone gets 200 for
    must survive a power cut. (Tests of behaviour, not durability, pass 'off'.)
    """
    path = os.path.abspath(path)
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    media = os.path.abspath(media_dir or os.path.join(folder, 'media'))
    os.makedirs(media, exist_ok=True)
    if not db.is_closed():
        db.close()
    LogWriter.stop_current()
    db.init(path, timeout=busy_timeout, pragmas=(
        ('journal_mode', 'wal'),
        ('synchronous', synchronous),
        ('foreign_keys', 1),
        ('cache_size', -16000),
        ('busy_timeout', int(busy_timeout * 1000)),
    ))
    _state.update(media=media, path=path)
    _settings_cache.clear()
    for copy in _ALL_COPIES:
        copy.drop()
    migrate()
    return db


def media_dir():
    return _state['media']


def migrate():
    """Bring the schema to the current version (PRAGMA user_version), a step at a
    time; the version is read again under the write lock, so processes opening
    the same old file at once take each step once."""
    while db.execute_sql('PRAGMA user_version').fetchone()[0] < len(MIGRATIONS):
        with db.immediate():
            version = db.execute_sql('PRAGMA user_version').fetchone()[0]
            if version < len(MIGRATIONS):
                MIGRATIONS[version]()
                db.execute_sql('PRAGMA user_version = %d' % (version + 1))


def now():
    return time.time()


SQL_INT = 2 ** 62   # SQLite stores 64-bit integers: anything past this is no id, count or priority
EARLIEST, LATEST = 946684800, 4102444800   # 2000-01-01 .. 2100-01-01: the times anyone can mean
TIME_FORMATS = ('%Y-%m-%d %H:%M:%S', '%Y-%m-%d %H:%M', '%Y-%m-%d')


def local_time(text):
    """Epoch seconds of a local `YYYY-MM-DD[ T]HH:MM[:SS]` or date; None when it is none."""
    text = text.strip().replace('T', ' ')
    for fmt in TIME_FORMATS:
        try:
            return time.mktime(time.strptime(text, fmt))
        except (ValueError, OverflowError):
            continue
    return None


def plausible_time(epoch):
    """The epoch when it falls between the years 2000 and 2100, else None."""
    return epoch if epoch is not None and EARLIEST <= epoch <= LATEST else None


def fmt_time(ts, sep=' '):
    """Local time as `YYYY-MM-DD HH:MM:SS` (or with `T` between), '' for None."""
    if ts is None:
        return ''
    try:
        return time.strftime('%Y-%m-%d' + sep + '%H:%M:%S', time.localtime(ts))
    except (ValueError, OverflowError, OSError):
        return str(ts)


def valid_unicode(text):
    """Text any database takes: lone surrogates (from JSON's \\ud800 escapes) become U+FFFD."""
    try:
        text.encode('utf-8')
        return text
    except UnicodeEncodeError:
        return text.encode('utf-16', 'surrogatepass').decode('utf-16', 'replace')


def check_in(field, values):
    return Check('%s IN (%s)' % (field, ', '.join("'%s'" % v for v in values)))


# --------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------

class BaseModel(Model):
    class Meta:
        database = db
        legacy_table_names = False


class Phone(BaseModel):
    """A phone is its SIM (imsi, iccid); a coverage phone without one, its MAC."""
    imsi = CharField(null=True)
    iccid = CharField(null=True)
    mac = CharField(null=True)
    phone_type = IntegerField(default=2)
    label = CharField(null=True, unique=True)
    offline = BooleanField(default=False)
    approved = BooleanField(default=True)
    rest_day = IntegerField(null=True)
    rest_night = IntegerField(null=True)
    refresh_profile = BooleanField(default=False)
    # The Xiaohongshu account bound to this SIM (update_userinfo).
    xhs_id = CharField(null=True, unique=True)
    account_name = CharField(null=True)
    home_url = TextField(null=True)
    phone_num = CharField(null=True)
    platform = IntegerField(null=True)
    profile_at = FloatField(null=True)
    reading_at = FloatField(null=True)
    created_at = FloatField(default=now)
    last_seen = FloatField(null=True)
    last_ip = CharField(null=True)

    class Meta:
        indexes = ((('imsi', 'iccid'), True),)
        constraints = [Check('phone_type IN (1, 2)')]

    @property
    def name(self):
        return self.label or self.imsi or self.mac or str(self.id)


class Comment(BaseModel):
    """A comment a phone saw under its account's notes."""
    phone = ForeignKeyField(Phone, backref='comments')
    nick_name = TextField()
    head_portrait = TextField(default='')
    comments_status = TextField(default='')
    content = TextField()
    article_picture_address = TextField(default='')
    screenshots_address = TextField(default='')
    note = DeferredForeignKey('Task', null=True, backref='comments')
    delete_state = CharField(default=DEL_NONE, constraints=[check_in('delete_state', DELETE_STATES)])
    delete_ordered_at = FloatField(null=True)
    delete_done_at = FloatField(null=True)
    created_at = FloatField(default=now)

    class Meta:
        indexes = ((('phone', 'nick_name', 'content'), True),)


class Task(BaseModel):
    """Release notes, DM replies and comment replies share one id space."""
    kind = CharField(constraints=[check_in('kind', TASK_KINDS)])
    status = CharField(default=PENDING, constraints=[check_in('status', TASK_STATES)])
    target_phone = ForeignKeyField(Phone, null=True, backref='targeted')
    target_account = CharField(null=True)
    priority = IntegerField(default=0)
    run_at = FloatField(default=0)
    title = TextField(null=True)
    content = TextField(default='')
    images = TextField(null=True)   # JSON list: URLs, or "media:<name>" for stored files
    topics = TextField(null=True)   # JSON list
    platform = IntegerField(default=1)
    name = TextField(null=True)     # DM counterpart
    comment = ForeignKeyField(Comment, null=True, backref='replies')
    claimed_by = ForeignKeyField(Phone, null=True, backref='claimed')
    claimed_at = FloatField(null=True)
    done_at = FloatField(null=True)
    result_url = TextField(null=True)
    url_key = TextField(null=True)
    note_key = CharField(null=True)
    created_at = FloatField(default=now)


class Number(BaseModel):
    """An imported phone number; bound to at most one SIM, a SIM to at most one number."""
    number = CharField(unique=True)
    iccid = CharField(null=True)  # pre-assigned to this SIM by the operator
    phone = ForeignKeyField(Phone, null=True, unique=True, backref='numbers')
    bound_at = FloatField(null=True)
    created_at = FloatField(default=now)


class Code(BaseModel):
    """A received SMS (or a code the operator typed in) for one of our numbers."""
    number = CharField()
    code = CharField(null=True)
    content = TextField(default='')
    sender = CharField(null=True)
    sent_at = FloatField(null=True)
    received_at = FloatField(default=now)
    source = CharField(default='sms')

    class Meta:
        indexes = ((('number', 'received_at'), False),)


class Profile(BaseModel):
    """A queued new-account profile, handed out to phones registering accounts."""
    gender_id = IntegerField(constraints=[Check('gender_id IN (1, 2)')])
    gender = CharField()
    head_portrait = TextField(default='')
    birthday = CharField()
    name = CharField()
    platform = IntegerField(default=1)
    state = CharField(default=AVAILABLE, constraints=[check_in('state', (AVAILABLE, RESERVED, USED))])
    reserved_by = ForeignKeyField(Phone, null=True, backref='+')
    reserved_until = FloatField(null=True)
    used_by = ForeignKeyField(Phone, null=True, backref='+')
    used_at = FloatField(null=True)
    created_at = FloatField(default=now)

    class Meta:
        indexes = ((('state', 'id'), False), (('name',), False))


class Image(BaseModel):
    """A stored image file, once per content hash; `keep`: an operator's note image."""
    sha256 = CharField(unique=True)
    name = CharField(unique=True)
    mime = CharField()
    size = IntegerField()
    keep = BooleanField(default=False)
    created_at = FloatField(default=now)


class Screenshot(BaseModel):
    image = ForeignKeyField(Image, backref='screenshots', on_delete='CASCADE')
    phone = ForeignKeyField(Phone, null=True, backref='screenshots')
    kind = CharField(constraints=[check_in('kind', SCREENSHOT_KINDS)])
    counterpart = TextField(default='')
    created_at = FloatField(default=now)

    class Meta:
        indexes = ((('phone', 'image', 'kind', 'counterpart'), True), (('created_at',), False),
                   (('image',), False))


class NoteLink(BaseModel):
    """An article screenshot tied to the published note it shows."""
    shot_key = TextField(unique=True)
    note = ForeignKeyField(Task, backref='links')
    created_at = FloatField(default=now)


class Log(BaseModel):
    at = FloatField(default=now)
    phone = ForeignKeyField(Phone, null=True, backref='logs', on_delete='SET NULL')
    msg = TextField()
    macaddr = TextField(null=True)
    ip_addr = TextField(null=True)
    imsi = TextField(null=True)
    iccid = TextField(null=True)
    phone_type = TextField(null=True)
    remote = CharField(null=True)

    class Meta:
        indexes = ((('phone', 'id'), False), (('at',), False))


class Setting(BaseModel):
    key = CharField(primary_key=True)
    value = TextField()


class PhoneEvent(BaseModel):
    """A change in a phone's activity: it went quiet, or it came back."""
    phone = ForeignKeyField(Phone, backref='events')
    at = FloatField(default=now)
    event = CharField(constraints=[check_in('event', ('inactive', 'active'))])

    class Meta:
        indexes = ((('phone', 'at'), False),)


class Audit(BaseModel):
    """A CLI command that changed data: when, who, what."""
    at = FloatField(default=now, index=True)
    user = CharField()
    command = TextField()
    change = TextField()


MODELS = [Phone, Task, Comment, Number, Code, Profile, Image, Screenshot, NoteLink, Log,
          Setting, PhoneEvent, Audit]


def _schema_v1():
    db.create_tables(MODELS)
    for sql in (
        # A coverage phone with no SIM is identified by its MAC alone.
        'CREATE UNIQUE INDEX phone_mac_only ON phone (mac) WHERE imsi IS NULL',
        # The claim queries below read these indexes in their ORDER BY order;
        # finished tasks are not in them, so a claim costs the same at any age.
        'CREATE INDEX task_queue ON task (kind, target_phone_id, target_account, '
        "priority DESC, id) WHERE status = 'pending'",
        'CREATE INDEX task_account_queue ON task (kind, target_account, priority DESC, id) '
        "WHERE status = 'pending' AND target_account IS NOT NULL",
        'CREATE INDEX task_claimed ON task (claimed_by_id, kind, claimed_at, id) '
        "WHERE status = 'claimed'",
        'CREATE INDEX task_done_at ON task (done_at)',
        'CREATE INDEX task_url_key ON task (url_key)',
        'CREATE INDEX task_note_key ON task (note_key)',
        "CREATE INDEX comment_delete_queue ON comment (phone_id, delete_ordered_at, id) "
        "WHERE delete_state = 'ordered'",
        'CREATE INDEX number_free ON number (iccid, id) WHERE phone_id IS NULL',
    ):
        db.execute_sql(sql)


def _schema_v2():
    # A coverage phone the operator registered with its SIM and MAC, asking by MAC
    # alone when it can't read the SIM (find_phone_by_mac).
    db.execute_sql('CREATE INDEX phone_mac ON phone (mac)')


MIGRATIONS = [_schema_v1, _schema_v2]


# --------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------

_settings_cache = {}
SETTINGS_TTL = 2.0


def settings(fresh=False):
    """All tunables (stored values over defaults); cached briefly for the server."""
    cached = _settings_cache.get('values')
    if cached and not fresh and time.monotonic() - cached[0] < SETTINGS_TTL:
        return cached[1]
    values = {key: default for key, (default, _) in SETTINGS.items()}
    for key, value in db.execute_sql('SELECT key, value FROM setting'):
        if key in SETTINGS:
            values[key] = parse_setting(key, value)
    _settings_cache['values'] = (time.monotonic(), values)
    return values


# The largest sensible value of each number setting (minutes, days, MB, count).
SETTING_MAXIMA = {'rest_day': 1440, 'rest_night': 1440, 'activity_window': 1440, 'code_lifetime': 1440,
                  'reservation_window': 10080, 'max_body_mb': 1024, 'max_image_mb': 256,
                  'max_images': 100, 'screenshot_retention_days': 3650, 'stuck_minutes': 10080,
                  'alert_every': 10080}


def parse_setting(key, value):
    """Validate a setting's text; raise ValueError with a readable reason."""
    default = SETTINGS[key][0]
    if isinstance(default, str):
        if key.endswith('_start') and not re.fullmatch(r'([01]\d|2[0-3]):[0-5]\d', value):
            raise ValueError('%s must be a time HH:MM' % key)
        if key == 'alert_webhook' and value and not is_http_url(value):
            raise ValueError('alert_webhook must be an http(s) URL, or empty to turn alerts off')
        return value
    low = 1 if key.startswith('max_') else 0
    if not re.fullmatch(r'\d{1,9}', str(value)) or not low <= int(value) <= SETTING_MAXIMA[key]:
        raise ValueError('%s must be a whole number from %d to %d' % (key, low, SETTING_MAXIMA[key]))
    return int(value)


def is_http_url(text):
    return bool(re.fullmatch(r'https?://[^\s/?#]+[^\s]*', text))


def set_setting(key, value):
    parsed = parse_setting(key, value)
    Setting.replace(key=key, value=str(parsed)).execute()
    _settings_cache.clear()
    return parsed


def rest_minutes(phone_rest_day, phone_rest_night, at=None):
    """The rest interval a phone is told now: its own value, else the global one."""
    values = settings()
    clock = time.strftime('%H:%M', time.localtime(at or now()))
    if values['day_start'] <= clock < values['night_start']:
        own, default = phone_rest_day, values['rest_day']
    else:
        own, default = phone_rest_night, values['rest_night']
    return own if own is not None else default


# --------------------------------------------------------------------------
# Phones
# --------------------------------------------------------------------------

# What a request needs of its phone (each column fetched costs a poll about a microsecond).
PHONE_COLUMNS = ('id', 'mac', 'phone_type', 'offline', 'approved', 'rest_day', 'rest_night',
                 'refresh_profile', 'xhs_id', 'reading_at', 'last_seen')
_PHONE_SELECT = 'SELECT %s FROM phone ' % ', '.join(PHONE_COLUMNS)
_LAST_SEEN = PHONE_COLUMNS.index('last_seen')


def _phone_row(cursor):
    row = cursor.fetchone()
    return dict(zip(PHONE_COLUMNS, row)) if row else None


# The phone's row and, for a task poll, whether a claim could find anything: a
# task of the kind it holds unfinished, or one pending. Most polls find nothing,
# and this tells them in the statement that finds the phone.
_PHONE_WAITING_SELECT = (
    'SELECT %s, EXISTS (SELECT 1 FROM task WHERE claimed_by_id = phone.id AND kind = ? '
    "AND status = 'claimed') OR EXISTS (SELECT 1 FROM task WHERE status = 'pending' AND kind = ?) "
    'FROM phone ' % ', '.join(PHONE_COLUMNS))


# --------------------------------------------------------------------------
# The phone table in memory: what every request asks first
# --------------------------------------------------------------------------

COPY_TTL = 1.0   # seconds a copy answers before it is read again (others' writes show by then)


class Copy:
    """What a query found, kept in memory for COPY_TTL seconds for the server's lookups.

    Every phone request starts by finding its phone. As a statement that costs
    more than its microseconds: sqlite3 lets go of the GIL for it, another worker
    takes it, and the first waits for its turn back (20 context switches a poll
    instead of 12; the watchdog poll answered at 64 % of the ceiling, and at 85
    to 90 % served from memory, in one measured run). So the server reads the
    whole phone table at most once a COPY_TTL and finds phones in that copy, and
    task polls learn from a second copy whether anything may be waiting.

    Fresh enough by construction:
    - this process's writes to the table (any statement through
      Database.execute_sql, peewee's included) drop the copy once committed, so
      a request reads what an earlier one wrote; a copy read while a write
      committed is not kept (`writes` moved);
    - touch() moves only last_seen and patches the copy in place (and a copy
      being read meanwhile, before it is kept: patch());
    - other processes' writes (the operator's CLI) show within COPY_TTL.
    Correctness never rests on it: every claim is still one atomic statement,
    and a copy that says a task may be waiting when none is costs one query.
    Only the server turns copies on (xhs_server.configure); the CLI asks SQLite.
    """

    def __init__(self, load):
        self.load = load
        self.enabled = False
        self.current = None       # (monotonic time of the read, what load() returned)
        self.writes = 0           # moved by every drop
        self.patches = None       # while a read is under way: patch() calls to apply to it
        self.lock = threading.Lock()      # a drop or patch against keeping a fresh read
        self.reading = threading.Lock()   # one thread reads at a time; the others go on

    def get(self):
        """The copy, or None: then ask SQLite (copies off, dropped, or being read)."""
        current = self.current
        if current is not None and time.monotonic() - current[0] < COPY_TTL:
            return current[1]
        if not self.enabled or not self.reading.acquire(blocking=False):
            return None
        try:
            with self.lock:
                writes, started, self.patches = self.writes, time.monotonic(), []
            value = self.load()
            with self.lock:
                patches, self.patches = self.patches, None
                if self.writes != writes:
                    return None
                for change in patches:   # made after the read began: it may not show them
                    change(value)
                self.current = (started, value)
            return value
        finally:
            self.reading.release()

    def drop(self):
        with self.lock:
            self.writes += 1
            self.current = None

    def patch(self, change):
        """Apply change(value) to the copy, and to one being read now, for a write
        (committed before this call) that moves only what `change` sets."""
        with self.lock:
            if self.current is not None:
                change(self.current[1])
            if self.patches is not None:
                self.patches.append(change)


_PHONES_SQL = 'SELECT imsi, iccid, %s FROM phone' % ', '.join(PHONE_COLUMNS)
_HOLDERS_SQL = "SELECT claimed_by_id, kind FROM task WHERE status = 'claimed'"


def _load_phones():
    """{(imsi, iccid): values}, {mac: values} as find_phone_by_mac finds them, {id: values}."""
    by_sim, by_mac, by_id, coverage = {}, {}, {}, {}
    for row in db.execute_sql(_PHONES_SQL):
        values = list(row[2:])
        by_id[values[0]] = values
        mac = values[1]
        if row[0] is not None:
            by_sim[row[0], row[1]] = values
            if mac is not None and values[2] == 1 and _seen_later(values, coverage.get(mac)):
                coverage[mac] = values
        elif mac is not None:
            by_mac[mac] = values
    for mac, values in coverage.items():
        by_mac.setdefault(mac, values)
    return by_sim, by_mac, by_id


def _seen_later(values, other):
    """Whether a phone's row is the one find_phone_by_mac prefers to `other` (or None)."""
    if other is None:
        return True
    key = (lambda v: (v[_LAST_SEEN] is not None, v[_LAST_SEEN] or 0, v[0]))
    return key(values) > key(other)


_WAITING_SQL = 'SELECT %s' % ', '.join(
    "EXISTS (SELECT 1 FROM task WHERE status = 'pending' AND kind = '%s')" % kind for kind in TASK_KINDS)


def _load_waiting():
    """{kind: (a task of it is pending, ids of phones holding one unfinished)}."""
    pending = db.execute_sql(_WAITING_SQL).fetchone()
    holders = {kind: set() for kind in TASK_KINDS}
    for phone_id, kind in db.execute_sql(_HOLDERS_SQL):
        holders[kind].add(phone_id)
    return {kind: (bool(any_pending), holders[kind]) for kind, any_pending in zip(TASK_KINDS, pending)}


COPIES = {'phone': Copy(_load_phones), 'task': Copy(_load_waiting)}
_ALL_COPIES = tuple(COPIES.values())
_WRITTEN_TABLE = re.compile(
    r'\s*(?:INSERT(?:\s+OR\s+\w+)?\s+INTO|REPLACE\s+INTO|UPDATE(?:\s+OR\s+\w+)?|DELETE\s+FROM)\s+"?(\w+)', re.I)


def copies_of(sql):
    """The copies a write statement makes stale (all of them when its table is not plain)."""
    found = _WRITTEN_TABLE.match(sql)
    if found is None:
        return _ALL_COPIES
    copy = COPIES.get(found.group(1).lower())
    return (copy,) if copy else ()


def keep_copies(on=True):
    """Answer the server's phone lookups from copies in memory (Copy)."""
    for copy in _ALL_COPIES:
        copy.enabled = on
        copy.drop()


def _phone_dict(values, waiting):
    phone = dict(zip(PHONE_COLUMNS, values))
    if waiting is not None:
        found = COPIES['task'].get()
        if found is None:
            return None
        any_pending, holders = found[waiting]
        phone['waiting'] = any_pending or phone['id'] in holders
    return phone


def find_phone_by_sim(imsi, iccid, waiting=None):
    """The phone with this SIM; with `waiting` (a task kind), its row says under 'waiting'
    whether a task of that kind may be there for it."""
    phones = COPIES['phone'].get()
    values = phones and phones[0].get((imsi, iccid))
    if values:
        phone = _phone_dict(values, waiting)
        if phone is not None:
            return phone
    if waiting is None:
        return _phone_row(db.execute_sql(_PHONE_SELECT + 'WHERE imsi = ? AND iccid = ?', (imsi, iccid)))
    row = db.execute_sql(_PHONE_WAITING_SELECT + 'WHERE imsi = ? AND iccid = ?',
                         (waiting, waiting, imsi, iccid)).fetchone()
    return dict(zip(PHONE_COLUMNS + ('waiting',), row)) if row else None


def find_phone_by_mac(mac):
    """The coverage phone with this MAC: the one known by it alone, else the phone of
    type 1 the operator registered with a SIM and this MAC (its SIM unreadable now;
    the most recently seen, if several)."""
    phones = COPIES['phone'].get()
    values = phones and phones[1].get(mac)
    if values:
        return _phone_dict(values, None)
    return _phone_row(db.execute_sql(_PHONE_BY_MAC, (mac,)))


_PHONE_BY_MAC = (_PHONE_SELECT + 'WHERE mac = ? AND (imsi IS NULL OR phone_type = 1) '
                 'ORDER BY imsi IS NOT NULL, last_seen IS NOT NULL DESC, last_seen DESC, id DESC LIMIT 1')


def phone_for(imsi=None, iccid=None, mac=None, phone_type=None, approved=True, waiting=None):
    """The phone with this SIM (or, with no SIM, this MAC), registered on first sight.

    `waiting`: a task kind, for find_phone_by_sim (SIM phones only).
    """
    find = (lambda: find_phone_by_sim(imsi, iccid, waiting)) if imsi else (lambda: find_phone_by_mac(mac))
    phone = find()
    if phone is None:
        db.execute_sql(
            'INSERT OR IGNORE INTO phone (imsi, iccid, mac, phone_type, approved, offline, '
            'refresh_profile, created_at) VALUES (?, ?, ?, ?, ?, 0, 0, ?)',
            (imsi, iccid, mac, phone_type or (2 if imsi else 1), approved, now()))
        phone = find()
    updates = {}
    if mac and imsi and phone['mac'] != mac:
        updates['mac'] = mac
    if phone_type and phone['phone_type'] != phone_type:
        updates['phone_type'] = phone_type
    if updates:
        try:
            Phone.update(updates).where(Phone.id == phone['id']).execute()
        except IntegrityError:
            pass  # the MAC is another phone's: keep the identity we have
        phone.update(updates)
    return phone


def touch(phone, ip=None):
    """Stamp a phone's last activity; skipped when its row is fresher than ACTIVITY_STAMP_SECONDS,
    so a busy phone costs one write per interval, not one per request."""
    at = now()
    if phone['last_seen'] is not None and at - phone['last_seen'] < ACTIVITY_STAMP_SECONDS:
        return
    with db.write_turn():   # not execute_sql: the copy of the phones is patched, not dropped
        db.run('UPDATE phone SET last_seen = ?, last_ip = ? WHERE id = ?', (at, ip, phone['id']))
    phone['last_seen'] = at

    def stamp(phones):
        values = phones[2].get(phone['id'])
        if values:
            values[_LAST_SEEN] = max(at, values[_LAST_SEEN] or at)
    COPIES['phone'].patch(stamp)


def is_active(last_seen, at=None):
    window = settings()['activity_window'] * 60
    return last_seen is not None and (at or now()) - last_seen <= window


def resolve_phone(ref):
    """A phone named by label, id, imsi or iccid (the CLI's way); None if unknown."""
    ref = str(ref).strip()
    by_id = Phone.id == int(ref) if ref.isdigit() and len(ref) < 10 else False
    match = by_id | (Phone.label == ref) | (Phone.imsi == ref) | (Phone.iccid == ref) | (Phone.mac == ref.lower())
    # An exact label wins over a number that happens to be another phone's id.
    return Phone.select().where(match).order_by(Phone.label != ref, Phone.id).first()


def phone_label(phone_id):
    row = db.execute_sql('SELECT label, imsi, mac FROM phone WHERE id = ?', (phone_id,)).fetchone()
    return next((value for value in row if value), str(phone_id)) if row else ''


# --------------------------------------------------------------------------
# Logs
# --------------------------------------------------------------------------

_LOG_INSERT = ('INSERT INTO log (at, phone_id, msg, macaddr, ip_addr, imsi, iccid, phone_type, remote) '
               'VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)')


class LogWriter:
    """Commits the log lines of concurrent requests together: one disk flush a batch.

    With synchronous=FULL each commit waits for the disk (a quarter of a
    millisecond on a quiet SSD, several on a busy one), so a commit per line
    caps the server at a few hundred lines a second. Requests hand their line to
    this thread and wait; it writes everything queued meanwhile in one
    transaction, then answers them all. A request still returns only after its
    line is on disk, and a failed batch fails each of its requests.
    """
    BATCH = 500
    _current = None
    _lock = threading.Lock()  # only for starting the thread once

    def __init__(self):
        self.pending = queue.SimpleQueue()
        threading.Thread(target=self.run, name='xhs-log-writer', daemon=True).start()

    @classmethod
    def current(cls):
        with cls._lock:
            if cls._current is None:
                cls._current = cls()
            return cls._current

    @classmethod
    def stop_current(cls):
        with cls._lock:
            if cls._current is not None:
                cls._current.pending.put(None)
                cls._current = None

    def write(self, row):
        slot = [threading.Event(), None]
        self.pending.put((row, slot))
        if not slot[0].wait(db._timeout + 30):
            raise OperationalError('database is locked (the log writer did not answer)')
        if isinstance(slot[1], Exception):
            raise slot[1]
        return slot[1]

    def run(self):
        while True:
            batch = [self.pending.get()]
            while batch[-1] is not None and len(batch) < self.BATCH:
                try:
                    batch.append(self.pending.get_nowait())
                except queue.Empty:
                    break
            stop = batch[-1] is None
            self.commit([item for item in batch if item is not None])
            if stop:
                db.close()
                return

    def commit(self, batch):
        try:
            with db.immediate():
                results = [db.execute_sql(_LOG_INSERT, row).lastrowid for row, _ in batch]
        except Exception as error:  # every waiting request gets it (503 or 500 there)
            results = [error] * len(batch)
        for (_, slot), result in zip(batch, results):
            slot[1] = result
            slot[0].set()


def add_log(msg, phone_id=None, macaddr=None, ip_addr=None, imsi=None, iccid=None,
            phone_type=None, remote=None):
    """Store a log line (on disk when this returns, or with the caller's transaction); its id."""
    row = (now(), phone_id, msg, macaddr, ip_addr, imsi, iccid, phone_type, remote)
    if db.in_transaction():
        return db.execute_sql(_LOG_INSERT, row).lastrowid
    return LogWriter.current().write(row)


def prune_logs(cutoff, batch=2000):
    """Delete log lines older than `cutoff` in short transactions; yields each batch's count."""
    while True:
        count = db.execute_sql('DELETE FROM log WHERE id IN (SELECT id FROM log WHERE at < ? LIMIT ?)',
                               (cutoff, batch)).rowcount
        if not count:
            return
        yield count


def system_log(msg, phone_id=None):
    """A line written by the server itself, shown with the phone logs."""
    return add_log('[server] ' + msg, phone_id=phone_id)


# --------------------------------------------------------------------------
# Accounts (update_userinfo and friends)
# --------------------------------------------------------------------------

def update_account(phone_id, phone_num, name, xhs_id, home_url, mac, platform):
    """Bind the account to this SIM; move it here if another SIM had it."""
    with db.immediate():
        previous = db.execute_sql('SELECT id FROM phone WHERE xhs_id = ? AND id != ?',
                                  (xhs_id, phone_id)).fetchone()
        if previous:
            db.execute_sql('UPDATE phone SET xhs_id = NULL WHERE id = ?', (previous[0],))
            system_log('小红书账号 %s 从手机 %s 移到 %s' % (xhs_id, phone_label(previous[0]),
                                                     phone_label(phone_id)), phone_id)
        db.execute_sql(
            'UPDATE phone SET xhs_id = ?, account_name = ?, home_url = ?, phone_num = ?, '
            'platform = ?, profile_at = ?, refresh_profile = 0, mac = COALESCE(?, mac) WHERE id = ?',
            (xhs_id, name, home_url, phone_num, platform, now(), mac, phone_id))
        db.execute_sql(
            "UPDATE profile SET state = 'used', used_by_id = ?, used_at = ? WHERE id = ("
            "SELECT id FROM profile WHERE name = ? AND state != 'used' "
            'ORDER BY reserved_by_id IS ? DESC, id LIMIT 1)',
            (phone_id, now(), name, phone_id))


def stamp_reading(phone_id):
    db.execute_sql('UPDATE phone SET reading_at = ? WHERE id = ?', (now(), phone_id))


def local_date(ts):
    return time.strftime('%Y-%m-%d', time.localtime(ts))


def needs_reading_update(reading_at):
    return reading_at is None or local_date(reading_at) != local_date(now())


# --------------------------------------------------------------------------
# Tasks: hand-out and completion
# --------------------------------------------------------------------------

TASK_COLUMNS = ('id', 'kind', 'status', 'title', 'content', 'images', 'topics', 'platform',
                'name', 'comment_id', 'claimed_by_id', 'claimed_at', 'done_at',
                'result_url', 'url_key', 'created_at')
_TASK_FIELDS = ', '.join(TASK_COLUMNS)


# The next pending task for a phone: targeted at it or its account first, then
# untargeted; within each, higher priority, then older. Each branch reads the
# partial index task_queue / task_account_queue in order.
_NEXT_SQL = '''SELECT id FROM (
    SELECT id, 0 AS grp, priority FROM (SELECT id, priority FROM task
        WHERE status = 'pending' AND kind = :kind AND target_phone_id = :phone
          AND target_account IS NULL AND run_at <= :now ORDER BY priority DESC, id LIMIT 1)
    UNION ALL
    SELECT id, 0, priority FROM (SELECT id, priority FROM task
        WHERE status = 'pending' AND kind = :kind AND target_account = :account
          AND run_at <= :now ORDER BY priority DESC, id LIMIT 1)
    UNION ALL
    SELECT id, 1, priority FROM (SELECT id, priority FROM task
        WHERE status = 'pending' AND kind = :kind AND target_phone_id IS NULL
          AND target_account IS NULL AND run_at <= :now ORDER BY priority DESC, id LIMIT 1)
    ) ORDER BY grp, priority DESC, id LIMIT 1'''

# The phone's own unfinished task if it has one, else whether one is waiting.
_LOOK_SQL = '''SELECT state, id FROM (
    SELECT * FROM (SELECT 'claimed' AS state, id FROM task WHERE claimed_by_id = :phone
        AND kind = :kind AND status = 'claimed' ORDER BY claimed_at, id LIMIT 1)
    UNION ALL
    SELECT 'pending', id FROM (%s)) ORDER BY state LIMIT 1''' % _NEXT_SQL

_CLAIM_SQL = ('UPDATE task SET status = %r, claimed_by_id = :phone, claimed_at = :now '
              'WHERE id = (%s) AND status = %r RETURNING %s'
              % (CLAIMED, _NEXT_SQL, PENDING, _TASK_FIELDS))


def _task_row(row):
    return dict(zip(TASK_COLUMNS, row)) if row else None


def claim_next(kind, phone_id, account=None):
    """The phone's unfinished task of this kind, or the next one, now claimed by it.

    A claimed task stays the phone's until it is reported done (or the operator
    requeues it), so a lost answer is simply handed out again. Polls ask
    find_phone_by_sim(waiting=kind) first, which tells most of them there is
    nothing to claim.
    """
    args = {'kind': kind, 'phone': phone_id, 'account': account, 'now': now()}
    # Reads first, without the write lock: the phone's own unfinished task,
    # else whether one waits for it.
    found = db.execute_sql(_LOOK_SQL, args).fetchone()
    if found is None:
        return None
    if found[0] == CLAIMED:
        return get_task(found[1])
    return _task_row(db.execute_sql(_CLAIM_SQL, args).fetchone())


def get_task(task_id, kind=None):
    row = db.execute_sql('SELECT %s, target_phone_id FROM task WHERE id = ?' % _TASK_FIELDS,
                         (task_id,)).fetchone()
    if not row:
        return None
    task = _task_row(row[:-1])
    task['target_phone_id'] = row[-1]
    return task if kind is None or task['kind'] == kind else None


class Conflict(Exception):
    """A completion that contradicts what is recorded."""


class NotFound(Exception):
    """An id that names nothing of the kind asked for."""


def url_key(url):
    """A URL without query string and fragment, host lowercased: what makes two equal."""
    match = re.match(r'^([a-zA-Z][a-zA-Z0-9+.-]*://)([^/?#]*)([^?#]*)', url.strip())
    if not match:
        return url.strip().split('?')[0].split('#')[0]
    return match.group(1).lower() + match.group(2).lower() + match.group(3).rstrip('/')


NOTE_ID_RE = re.compile(r'/(?:explore|discovery/item|item|notes?)/([0-9a-fA-F]{24})(?![0-9a-fA-F])')


def note_key(url):
    """The Xiaohongshu note id in a note URL, when it has one."""
    match = NOTE_ID_RE.search(url)
    return match.group(1).lower() if match else None


def complete_release(task_id, url, phone_id=None):
    """Record the published note's URL. Returns True when this call changed it."""
    key, nkey = url_key(url), note_key(url)
    with db.immediate():
        task = get_task(task_id, RELEASE)
        if task is None:
            raise NotFound()
        if phone_id is not None and task['claimed_by_id'] not in (None, phone_id):
            raise Conflict('任务属于其他手机')
        if task['status'] == DONE:
            same = task['url_key'] == key or (nkey and note_key(task['result_url'] or '') == nkey)
            if not same:
                raise Conflict()
            return False
        db.execute_sql(
            'UPDATE task SET status = ?, done_at = ?, result_url = ?, url_key = ?, note_key = ?, '
            'claimed_by_id = COALESCE(claimed_by_id, ?), claimed_at = COALESCE(claimed_at, ?) '
            'WHERE id = ?', (DONE, now(), url, key, nkey, phone_id, now(), task_id))
        return True


def complete_task(task_id, kind, done_at=None):
    """Mark a reply task done (repeat: no change). Returns True when this call changed it."""
    cursor = db.execute_sql(
        'UPDATE task SET status = ?, done_at = ?, claimed_at = COALESCE(claimed_at, ?) '
        'WHERE id = ? AND kind = ? AND status != ?',
        (DONE, done_at or now(), now(), task_id, kind, DONE))
    if cursor.rowcount:
        return True
    if get_task(task_id, kind) is None:
        raise NotFound()
    return False


def move_task(task_id, **changes):
    """Operator: change a task that is not done yet (a completion always wins)."""
    task = get_task(task_id)
    if task is None:
        raise NotFound()
    updated = Task.update(changes).where((Task.id == task_id) & (Task.status != DONE)).execute()
    if not updated:
        raise Conflict('task %d is already done' % task_id)
    return task


def requeue_task(task_id):
    """Operator: put a claimed (or cancelled) task back in the queue."""
    return move_task(task_id, status=PENDING, claimed_by=None, claimed_at=None)


def cancel_task(task_id):
    return move_task(task_id, status=CANCELLED, done_at=now())


# --------------------------------------------------------------------------
# Phone numbers and verification codes
# --------------------------------------------------------------------------

def normalize_number(text):
    """Digits of a mainland number: `+86`/`86` prefix, spaces and dashes dropped."""
    digits = re.sub(r'[\s\-()]', '', str(text or ''))
    if digits.startswith('+'):
        digits = digits[1:]
    if len(digits) == 13 and digits.startswith('86'):
        digits = digits[2:]
    return digits if re.fullmatch(r'\d{5,15}', digits) else None


# A number pre-assigned to this SIM's ICCID, else the oldest free unassigned one;
# each branch reads the partial index number_free in order.
_BIND_SQL = '''UPDATE number SET phone_id = :phone, bound_at = :now WHERE id = COALESCE(
    (SELECT id FROM number INDEXED BY number_free WHERE phone_id IS NULL AND iccid = :iccid
     ORDER BY id LIMIT 1),
    (SELECT id FROM number INDEXED BY number_free WHERE phone_id IS NULL AND iccid IS NULL
     ORDER BY id LIMIT 1))
    AND phone_id IS NULL RETURNING number'''


def number_for(phone_id, iccid):
    """The number bound to this SIM, binding a free one when it has none yet."""
    row = db.execute_sql('SELECT number FROM number WHERE phone_id = ?', (phone_id,)).fetchone()
    if row:
        return row[0]
    try:
        row = db.execute_sql(_BIND_SQL, {'phone': phone_id, 'now': now(), 'iccid': iccid}).fetchone()
    except IntegrityError:
        # The same SIM asked twice at once and the other request bound first.
        row = db.execute_sql('SELECT number FROM number WHERE phone_id = ?', (phone_id,)).fetchone()
    return row[0] if row else None


CODE_RE = re.compile(r'(?<![0-9A-Za-z])\d{4,8}(?![0-9A-Za-z])')
CODE_WORDS = re.compile(r'验证码|校验码|动态码|确认码|code', re.I)


def extract_code(text):
    """The verification code in an SMS: 4 to 8 digits, the nearest to 验证码 or code."""
    candidates = list(CODE_RE.finditer(text))
    if not candidates:
        return None
    words = [m.start() for m in CODE_WORDS.finditer(text)]
    if not words:
        return candidates[0].group()
    return min(candidates, key=lambda m: min(abs(m.start() - w) for w in words)).group()


def add_code(number, content, code=None, sender=None, sent_at=None, source='sms'):
    """Store an SMS (or a typed code); the same SMS again within a minute is stored once.

    Returns (id, code, stored_now).
    """
    code = code or extract_code(content)
    with db.immediate():
        row = db.execute_sql(
            'SELECT id, code FROM code WHERE number = ? AND content = ? AND sender IS ? AND code IS ? '
            'AND received_at >= ? ORDER BY id DESC LIMIT 1',
            (number, content, sender, code, now() - 60)).fetchone()
        if row:
            return row[0], row[1], False
        cursor = db.execute_sql(
            'INSERT INTO code (number, code, content, sender, sent_at, received_at, source) '
            'VALUES (?, ?, ?, ?, ?, ?, ?)', (number, code, content, sender, sent_at, now(), source))
        return cursor.lastrowid, code, True


def latest_code(number, since=None):
    """(code, received_at) of the newest code within its lifetime, or None."""
    oldest = now() - settings()['code_lifetime'] * 60
    if since is not None:
        oldest = max(oldest, since)
    return db.execute_sql(
        'SELECT code, received_at FROM code WHERE number = ? AND received_at >= ? '
        'AND code IS NOT NULL ORDER BY received_at DESC, id DESC LIMIT 1',
        (number, oldest)).fetchone()


# --------------------------------------------------------------------------
# New-account profiles
# --------------------------------------------------------------------------

PROFILE_COLUMNS = ('id', 'gender_id', 'gender', 'head_portrait', 'birthday', 'name', 'platform')
_PROFILE_FIELDS = ', '.join(PROFILE_COLUMNS)
_FREE_PROFILE = "(state = 'available' OR (state = 'reserved' AND reserved_until < :now))"
_OWN_PROFILE = "(state = 'reserved' AND reserved_by_id = :phone AND reserved_until >= :now)"


class NotEnough(Exception):
    def __init__(self, available):
        super().__init__(available)
        self.available = available


def reserve_profiles(count, phone_id=None):
    """Reserve `count` profiles for a phone; those it already holds come back first.

    Returns (profiles, available_before). Raises NotEnough, reserving nothing.
    Without a phone (:phone NULL) the "own" condition is never true.
    """
    args = {'now': now(), 'phone': phone_id, 'n': count,
            'until': now() + settings()['reservation_window'] * 60}
    with db.immediate():
        available = db.execute_sql(
            'SELECT COUNT(*) FROM profile WHERE %s OR %s' % (_FREE_PROFILE, _OWN_PROFILE), args).fetchone()[0]
        if available < count:
            raise NotEnough(available)
        rows = db.execute_sql(
            "UPDATE profile SET state = 'reserved', reserved_by_id = :phone, reserved_until = :until "
            'WHERE id IN (SELECT id FROM profile WHERE %s OR %s ORDER BY %s DESC, id LIMIT :n) '
            'RETURNING %s' % (_FREE_PROFILE, _OWN_PROFILE, _OWN_PROFILE, _PROFILE_FIELDS), args).fetchall()
    rows.sort(key=lambda row: row[0])
    return [dict(zip(PROFILE_COLUMNS, row)) for row in rows], available


# --------------------------------------------------------------------------
# Images and screenshots
# --------------------------------------------------------------------------

IMAGE_TYPES = (
    (b'\x89PNG\r\n\x1a\n', 'image/png', 'png'),
    (b'\xff\xd8\xff', 'image/jpeg', 'jpg'),
    (b'GIF87a', 'image/gif', 'gif'),
    (b'GIF89a', 'image/gif', 'gif'),
)


def image_type(data):
    """(mime, extension) from the magic bytes, or None when it is no image we keep."""
    if data[:4] == b'RIFF' and data[8:12] == b'WEBP':
        return 'image/webp', 'webp'
    for magic, mime, ext in IMAGE_TYPES:
        if data.startswith(magic):
            return mime, ext
    return None


def image_complete(data):
    """Whether the image ends as its format requires (a cut-off upload does not)."""
    kind = image_type(data)
    if kind is None:
        return False
    ext = kind[1]
    if ext == 'png':
        return data.endswith(b'IEND\xaeB`\x82')
    if ext == 'webp':
        return int.from_bytes(data[4:8], 'little') + 8 <= len(data)
    end = data.rstrip(b'\x00')   # some encoders pad after the end marker
    return end.endswith(b'\xff\xd9') if ext == 'jpg' else end.endswith(b';')


# A screenshot of megabytes is hashed while it is written: both run outside
# Python's lock, so the hash (~1.7 ms for 3 MB) costs no time of its own. The
# pool starts its threads on first use.
HASH_ASIDE = 512 * 1024
_hashers = ThreadPoolExecutor(2, thread_name_prefix='xhs-hash')


def sha256_hex(data):
    return hashlib.sha256(data).hexdigest()


def image_path(digest, ext):
    return os.path.join(media_dir(), '%s.%s' % (digest[:32], ext))


def store_image(data, keep=False):
    """Write the image once per content hash; returns its file name."""
    return store_images([data], keep)[0]


def store_images(images, keep=False, screenshots=None):
    """Write each image once per content hash, then record them (and, given
    `screenshots` (phone_id, kind, counterpart), a screenshot row for each) in one
    transaction: one flush to disk for all the rows. Returns the file names.

    The files are complete and on disk before any row names them, so a crash never
    leaves a reference to a half-written file. No database lock is held while
    writing. A big image goes to a temporary file while it is hashed, then takes
    its name (or is dropped when that file is already there).
    """
    written = [write_image(data) for data in images]
    with db.immediate():
        for data, (digest, mime, path) in zip(images, written):
            name = os.path.basename(path)
            db.execute_sql('INSERT OR IGNORE INTO image (sha256, name, mime, size, keep, created_at) '
                           'VALUES (?, ?, ?, ?, ?, ?)', (digest, name, mime, len(data), keep, now()))
            if keep:
                db.execute_sql('UPDATE image SET keep = 1 WHERE name = ? AND NOT keep', (name,))
            if screenshots:
                add_screenshot(name, *screenshots)
    for data, (_, _, path) in zip(images, written):
        if not os.path.exists(path):
            write_file(path, data)  # retention removed it between our check and our row
    return [os.path.basename(path) for _, _, path in written]


def write_image(data):
    """(sha256, mime type, path) of the image's file, written unless it is there."""
    mime, ext = image_type(data)
    if len(data) >= HASH_ASIDE:
        hashing = _hashers.submit(sha256_hex, data)
        tmp = write_temp(os.path.join(media_dir(), 'upload'), data)
        digest = hashing.result()
        path = image_path(digest, ext)
        if os.path.exists(path):
            os.remove(tmp)
        else:
            os.replace(tmp, path)
            sync_folder(path)
    else:
        digest = sha256_hex(data)
        path = image_path(digest, ext)
        if not os.path.exists(path):
            write_file(path, data)
    return digest, mime, path


def write_temp(path, data):
    """`data` in a new temporary file beside `path`, synced to disk; its name.
    If writing fails the temporary file is removed."""
    tmp = '%s.%s.tmp' % (path, secrets.token_hex(4))
    try:
        if not write_direct(tmp, data):
            with open(tmp, 'wb') as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
    except BaseException:
        with suppress(OSError):
            os.remove(tmp)
        raise
    return tmp


# Image files are written past the page cache (O_DIRECT): here a 3 MB screenshot
# took 6.7 ms to write and sync through the cache, most of it the kernel finding
# fresh pages for it, and 1.6 to 2.2 ms straight to the disk. O_DIRECT wants the
# memory, offset and length aligned, so the data goes out through a reused,
# page-aligned buffer a megabyte at a time, padded, then the file is cut to size.
DIRECT_PIECE = 1024 * 1024
DIRECT_ALIGN = 4096
_direct_buffers = queue.SimpleQueue()   # buffers not in use; a few, made when needed


def write_direct(path, data):
    """Create `path` holding `data`, synced, bypassing the page cache; False where
    the system or filesystem does not allow that (the caller then writes normally)."""
    flag = getattr(os, 'O_DIRECT', 0)
    if not flag:
        return False
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | flag, 0o666)   # less the umask, as open()
    except OSError:
        return False
    try:
        buffer = _direct_buffers.get_nowait()
    except queue.Empty:
        buffer = mmap.mmap(-1, DIRECT_PIECE)   # page-aligned
    try:
        view = memoryview(data)
        for start in range(0, len(data), DIRECT_PIECE):
            piece = view[start:start + DIRECT_PIECE]
            buffer[:len(piece)] = piece
            size = -len(piece) % DIRECT_ALIGN + len(piece)
            if os.write(fd, memoryview(buffer)[:size]) != size:
                raise OSError(errno.ENOSPC, 'short write')
        os.ftruncate(fd, len(data))
        os.fsync(fd)
        return True
    except OSError as error:
        if error.errno != errno.EINVAL:   # EINVAL: this filesystem refuses O_DIRECT writes
            raise
        return False
    finally:
        os.close(fd)
        if _direct_buffers.qsize() < 4:
            _direct_buffers.put(buffer)


def write_file(path, data):
    """Write to a temporary name, sync, then rename: the file is whole or absent."""
    os.replace(write_temp(path, data), path)
    sync_folder(path)


def sync_folder(path):
    """Put the folder entry of a file just renamed on disk too (0.1 ms here): a row
    naming the file must not outlive it in a power cut. Not possible everywhere."""
    with suppress(OSError):
        fd = os.open(os.path.dirname(path), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


TEMP_MAX_AGE = 3600   # seconds: a temporary image file older than this was left by a crash


def old_media_files(wanted, older_than=TEMP_MAX_AGE):
    """Names of the plain files in the media folder for which wanted(name) holds,
    unchanged for `older_than` seconds (symlinks are not followed; an entry that
    can't be looked at is passed over)."""
    cutoff, names = time.time() - older_than, []
    with os.scandir(media_dir()) as entries:
        for entry in entries:
            if wanted(entry.name):
                with suppress(OSError):   # gone meanwhile, or not ours to look at
                    if entry.is_file(follow_symlinks=False) and entry.stat(follow_symlinks=False).st_mtime < cutoff:
                        names.append(entry.name)
    return names


def remove_stale_temp(older_than=TEMP_MAX_AGE):
    """Remove temporary image files a killed process left in the media folder; their count."""
    removed = 0
    for name in old_media_files(lambda name: name.endswith('.tmp'), older_than):
        with suppress(FileNotFoundError):
            os.remove(os.path.join(media_dir(), name))
            removed += 1
    return removed


def prune_screenshots(cutoff, batch=500):
    """Delete screenshots taken before `cutoff`, and the image files nothing uses any more.

    Works in short transactions of `batch` rows so phones are never blocked for
    long; yields the number of screenshots deleted by each batch.
    """
    while True:
        with db.immediate():
            rows = db.execute_sql('SELECT id, image_id FROM screenshot WHERE created_at < ? LIMIT ?',
                                  (cutoff, batch)).fetchall()
            if not rows:
                return
            db.execute_sql('DELETE FROM screenshot WHERE id IN (%s)' % ','.join('?' * len(rows)),
                           [row[0] for row in rows])
            images = sorted({row[1] for row in rows})
            unused = db.execute_sql(
                'SELECT id, name FROM image WHERE id IN (%s) AND NOT keep AND NOT EXISTS '
                '(SELECT 1 FROM screenshot s WHERE s.image_id = image.id)' % ','.join('?' * len(images)),
                images).fetchall()
            db.execute_sql('DELETE FROM image WHERE id IN (%s)' % ','.join('?' * len(unused)),
                           [row[0] for row in unused])
            for _, name in unused:
                try:
                    os.remove(os.path.join(media_dir(), name))
                except FileNotFoundError:
                    pass
        yield len(rows)


def remove_orphan_images(older_than=TEMP_MAX_AGE, batch=500):
    """Remove image files no row names, older than `older_than` seconds: left by a
    request that failed after writing its file (a full disk, a killed server).
    Each is looked up and removed under the write lock, so an upload of the same
    image recording it meanwhile (it writes the file again if it is gone once its
    row is in) can't lose it. Returns their count."""
    names = old_media_files(MEDIA_NAME_RE.match, older_than)
    removed = 0
    for start in range(0, len(names), batch):
        some = names[start:start + batch]
        with db.immediate():
            known = {name for (name,) in db.execute_sql(
                'SELECT name FROM image WHERE name IN (%s)' % ','.join('?' * len(some)), some)}
            for name in some:
                if name not in known:
                    with suppress(FileNotFoundError):
                        os.remove(os.path.join(media_dir(), name))
                        removed += 1
    return removed


def add_screenshot(name, phone_id, kind, counterpart=''):
    db.execute_sql(
        'INSERT OR IGNORE INTO screenshot (image_id, phone_id, kind, counterpart, created_at) '
        'SELECT id, ?, ?, ?, ? FROM image WHERE name = ?',
        (phone_id, kind, counterpart, now(), name))


MEDIA_NAME_RE = re.compile(r'^[0-9a-f]{32}\.(png|jpg|gif|webp)$')


def shot_key(address):
    """What identifies a screenshot address: our media file name, else the bare URL."""
    key = url_key(address)
    tail = key.rsplit('/media/', 1)
    if len(tail) == 2 and MEDIA_NAME_RE.match(tail[1]):
        return tail[1]
    return key


# --------------------------------------------------------------------------
# Comments and note links
# --------------------------------------------------------------------------

def find_note(url):
    """The published release task whose URL (or note id) matches."""
    key, nkey = url_key(url), note_key(url)
    row = db.execute_sql("SELECT id FROM task WHERE url_key = ? AND kind = 'release' "
                         'ORDER BY id LIMIT 1', (key,)).fetchone()
    if row is None and nkey:
        row = db.execute_sql("SELECT id FROM task WHERE note_key = ? AND kind = 'release' "
                             'ORDER BY id LIMIT 1', (nkey,)).fetchone()
    return row[0] if row else None


def link_note(notes_url, screenshot):
    """Tie an article screenshot to its note: (note id, created now?) or NotFound."""
    note = find_note(notes_url)
    if note is None:
        raise NotFound()
    cursor = db.execute_sql('INSERT OR IGNORE INTO note_link (shot_key, note_id, created_at) '
                            'VALUES (?, ?, ?)', (shot_key(screenshot), note, now()))
    if cursor.rowcount:
        return note, True
    return linked_note(screenshot), False


def linked_note(screenshot):
    row = db.execute_sql('SELECT note_id FROM note_link WHERE shot_key = ?',
                         (shot_key(screenshot),)).fetchone()
    return row[0] if row else None


def add_comment(phone_id, fields):
    """Record a comment; (id, created now?). The same one again is not duplicated."""
    note = fields.get('article_notes_id') or linked_note(fields['article_picture_address'])
    if note is not None and get_task(note, RELEASE) is None:
        note = None  # a note id we do not know is kept off the link, not refused
    cursor = db.execute_sql(
        'INSERT OR IGNORE INTO comment (phone_id, nick_name, head_portrait, comments_status, '
        'content, article_picture_address, screenshots_address, note_id, delete_state, '
        'created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)',
        (phone_id, fields['nick_name'], fields['head_portrait'], fields['comments_status'],
         fields['comments_content'], fields['article_picture_address'],
         fields['screenshots_address'], note, DEL_NONE, now()))
    if cursor.rowcount:
        return cursor.lastrowid, True
    row = db.execute_sql('SELECT id FROM comment WHERE phone_id = ? AND nick_name = ? AND content = ?',
                         (phone_id, fields['nick_name'], fields['comments_content'])).fetchone()
    return row[0], False


# comment_type is the reply's type as the earlier server sent it: 1, a reply to a comment.
COMMENT_REPLY_SQL = '''SELECT t.id, 1, c.content, c.nick_name, c.article_picture_address,
    c.screenshots_address, t.platform, t.content, t.created_at, c.id, c.comments_status
    FROM task t JOIN comment c ON c.id = t.comment_id WHERE t.id = ?'''


def comment_reply_task(task_id):
    return db.execute_sql(COMMENT_REPLY_SQL, (task_id,)).fetchone()


def next_delete(phone_id):
    return db.execute_sql(
        'SELECT c.id, c.content, c.screenshots_address, c.nick_name, p.label, p.account_name, '
        'p.platform, p.imsi FROM comment c JOIN phone p ON p.id = c.phone_id '
        "WHERE c.phone_id = ? AND c.delete_state = 'ordered' "
        'ORDER BY c.delete_ordered_at, c.id LIMIT 1', (phone_id,)).fetchone()


# The phone's report on a deletion: the state it moves to, from which states,
# and which states mean "already reported the same".
DELETE_REPORTS = {
    DEL_DONE: ({DEL_ORDERED, DEL_FAILED}, {DEL_DONE}),
    DEL_FAILED: ({DEL_ORDERED}, {DEL_FAILED}),
}


def report_delete(comment_id, outcome):
    """Apply a phone's deletion report; True when it changed something."""
    allowed, same = DELETE_REPORTS[outcome]
    with db.immediate():
        row = db.execute_sql('SELECT delete_state FROM comment WHERE id = ?', (comment_id,)).fetchone()
        if row is None:
            raise NotFound()
        if row[0] in same:
            return False
        if row[0] not in allowed:
            raise Conflict()
        db.execute_sql('UPDATE comment SET delete_state = ?, delete_done_at = ? WHERE id = ?',
                       (outcome, now(), comment_id))
        return True


def order_delete(comment_id):
    """Operator: order a comment deleted (again, after a failure)."""
    with db.immediate():
        comment = Comment.get_or_none(Comment.id == comment_id)
        if comment is None:
            raise NotFound()
        if comment.delete_state == DEL_DONE:
            raise Conflict('comment %d is already deleted' % comment_id)
        if comment.delete_state == DEL_ORDERED:
            return False
        Comment.update(delete_state=DEL_ORDERED, delete_ordered_at=now(),
                       delete_done_at=None).where(Comment.id == comment_id).execute()
        return True


def order_reply(comment_id, text):
    """Operator: queue a reply to a comment, for the phone that reported it."""
    comment = Comment.get_or_none(Comment.id == comment_id)
    if comment is None:
        raise NotFound()
    platform = Phone.get_by_id(comment.phone_id).platform or 1
    return Task.create(kind=COMMENT_REPLY, target_phone=comment.phone_id, comment=comment_id,
                       content=text, platform=platform).id


def parse_json_list(text):
    return json.loads(text) if text else []
