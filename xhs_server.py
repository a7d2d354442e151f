"""xhs-server: the HTTP API the studio's phones call.

Every phone endpoint answers GET and POST, under `/<group>/<action>` with an
optional `/<digits>`, trailing slash and `/api_hurong` prefix, and always with
HTTP 200 and the envelope `{"code", "msg", "data", "note"}` (see API.md).
"""
import binascii
import codecs
import errno
import hmac
import ipaddress
import json
import logging
import os
import re
import signal
import socket
import sys
import threading
import time
import traceback
import urllib.parse
from contextlib import contextmanager

import bottle
import peewee
import pybase64
from bottle import Bottle, request, response

import models
from models import Conflict, NotEnough, NotFound

__version__ = '1.0.0'

log = logging.getLogger('xhs_server')

# --------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------

DEFAULT_ALLOW = ('127.0.0.0/8', '10.0.0.0/8', '172.16.0.0/12', '192.168.0.0/16',
                 '169.254.0.0/16', '100.64.0.0/10', '::1/128', 'fc00::/7', 'fe80::/10')
PREFIX = 'api_hurong'
JSON_TYPE = 'application/json; charset=utf-8'
DRAIN_LIMIT = 64 * 1024 * 1024   # an oversized body is read and dropped up to this, then cut
CHUNK = 64 * 1024
UNREAD_LIMIT = 1024 * 1024       # more unread body than this: close rather than let cheroot read it

MISSING = '缺少参数: %s'
INVALID = '参数无效: %s'
NOTHING = '当前无任务'

app = Bottle()
app.config.update({'xhs.token': '', 'xhs.allow': None, 'xhs.approve_new': False,
                   'xhs.access_log': False})


def configure(token=None, allow=None, approve_new=False, access_log=False):
    """Access rules: token (None: off), allowed networks (None: loopback and LAN), approval mode.

    Phones are then found in a copy of the phone table in memory (models.Copy).
    """
    networks = [ipaddress.ip_network(net, strict=False) for net in (allow or DEFAULT_ALLOW)]
    app.config.update({'xhs.token': token or '', 'xhs.allow': networks,
                       'xhs.approve_new': bool(approve_new), 'xhs.access_log': bool(access_log)})
    _allowed_cache.clear()
    models.keep_copies()


# --------------------------------------------------------------------------
# Answers
# --------------------------------------------------------------------------

class ApiError(Exception):
    """An answer other than success: the envelope's code and message."""

    def __init__(self, code, msg, data=None):
        super().__init__(msg)
        self.code, self.msg, self.data = code, msg, data


_JSON = json.JSONEncoder(ensure_ascii=False, separators=(',', ':'))


def envelope(code, msg, data=None, note=None):
    body = {'code': code, 'msg': msg, 'data': {} if data is None else data,
            'note': note or {}}
    return _JSON.encode(body).encode('utf-8')


def ok(data=None, msg='', note=None):
    return envelope(200, msg, data, note)


_NOTHING = {msg: ok({}, msg) for msg in (NOTHING, '无任务')}


def nothing(msg=NOTHING):
    return _NOTHING[msg]


def answer(body, status=200):
    if status != 200:   # bottle starts every response at 200
        response.status = status
    response.content_type = JSON_TYPE
    return body


# --------------------------------------------------------------------------
# Request parsing
# --------------------------------------------------------------------------

class Params:
    """Request parameters merged from query, body (JSON, urlencoded, multipart).

    Values are stripped strings; an empty value counts as missing. A name may
    carry several values (a repeated field or a JSON array).
    """

    def __init__(self):
        self.values = {}
        self.json = None

    def add(self, name, value, from_json=False):
        if value is None:
            return
        if isinstance(value, list):
            for item in value:
                self.add(name, item, from_json)
            return
        text = json_text(value).strip()
        if from_json:
            text = models.valid_unicode(text)
        if text:
            self.values.setdefault(name, []).append(text)

    def merge(self, other):
        """Take `other`'s names over ours (the body beats the query)."""
        self.values.update(other.values)
        self.json = other.json if other.json is not None else self.json

    def get(self, name):
        values = self.values.get(name)
        return values[0] if values else None

    def getall(self, name):
        return self.values.get(name, [])

    def __contains__(self, name):
        return name in self.values


def json_text(value):
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return 'true' if value else 'false'
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, (int, float)):
        return str(value)
    return json.dumps(value, ensure_ascii=False)


# Form values are decoded a piece at a time: the pieces stay in the CPU's cache,
# and a screenshot's megabytes are not copied whole at every step.
DECODE_PIECE = 64 * 1024


def form_text(data, start, end):
    """data[start:end] form-decoded (`+` is a space, `%XX` a byte) into text."""
    if data.find(b'%', start, end) < 0:
        if data.find(b'+', start, end) < 0:
            return decode_text(memoryview(data)[start:end])   # no copy before the text
        return decode_text(data[start:end].replace(b'+', b' '))
    decoder = FormDecoder(end - start > DECODE_PIECE)
    decoder.feed(data, start, end, final=True)
    text = decoder.text(data[max(start, end - 6):end])
    return slow_form_text(data[start:end]) if text is None else text


def slow_form_text(raw):
    """A form value decoded by urllib (Python), for what the C fast path can't read."""
    return decode_text(urllib.parse.unquote_to_bytes(raw.replace(b'+', b' ')))


class FormDecoder:
    """One form value, its bytes fed in order, decoded into text in C a piece at a time.

    A screenshot has a hundred thousand escapes, a Chinese log line hundreds:
    binascii's C decoder of quoted-printable (=XX) does them, literal '=' escaped
    first. Where it reads a text differently from a form decoder (a '%' not
    followed by two hex digits) it leaves a '='; line breaks (soft breaks to it)
    and a '%' in the value's last two bytes (dropped by it) are kept off this
    path: text() is then None, and urllib's decoder reads the value instead.
    Each piece becomes text at once (a character cut between pieces is joined),
    so a screenshot's megabytes are copied into one new buffer, the text.
    """

    def __init__(self, big):
        self.utf8 = codecs.getincrementaldecoder('utf-8')('replace').decode if big else None
        self.pieces = []
        self.fast = True

    def feed(self, data, start, end, final):
        """Decode data[start:end]; unless `final`, a '%' in its last two bytes waits
        for the next feed. Returns where decoding stopped."""
        if not self.fast:
            return end
        if (data.find(b'\r', start, end) >= 0 or data.find(b'\n', start, end) >= 0
                or final and data.find(b'%', max(start, end - 2), end) >= 0):
            self.fast = False
            return end
        at = start
        while at < end:
            stop = min(at + DECODE_PIECE, end)
            if stop < end or not final:
                cut = data.find(b'%', max(at, stop - 2), stop)
                if cut >= 0:   # no escape may straddle two pieces, nor end one
                    if data.find(b'%', max(at, cut - 2), cut) >= 0:
                        self.fast = False   # a run of '%': not for this path
                        return end
                    stop = cut
            if stop == at:   # an escape waiting for its digits (final: pieces too small)
                self.fast = not final
                break
            piece = data[at:stop]
            if b'+' in piece:
                piece = piece.replace(b'+', b' ')
            if b'=' in piece:
                piece = piece.replace(b'=', b'=3D')
            piece = binascii.a2b_qp(piece.replace(b'%', b'='))
            self.pieces.append(self.utf8(piece) if self.utf8 else str(piece, 'utf-8', 'replace'))
            at = stop
        return at

    def text(self, raw_tail):
        """The value's text, or None; `raw_tail`: the value's last 6 bytes as sent."""
        if not self.fast:
            return None
        if self.utf8:
            self.pieces.append(self.utf8(b'', True))
        text = ''.join(self.pieces)
        return text if escaped_equals_only(raw_tail, text) else None


def escaped_equals_only(raw_tail, decoded):
    """Whether every '=' in the `decoded` text is one the value ends with as '=' or
    '%3D' (base64 padding). Any other '=' may be the mark of an escape the fast
    path misread.
    """
    first = decoded.find('=')
    if first < 0:
        return True
    count = len(decoded) - first
    if count > 2:
        return False
    end = len(raw_tail)
    for _ in range(count):
        if raw_tail.endswith(b'=', 0, end):
            end -= 1
        elif raw_tail[max(0, end - 3):end] in (b'%3D', b'%3d'):
            end -= 3
        else:
            return False
    return True


class FormPair:
    """One name=value pair of a form body fed as it arrives, its value decoded meanwhile."""

    def __init__(self):
        self.fed = False
        self.name = None    # text, once the '=' has come
        self.head = []      # the name's bytes until then
        self.raw = []       # the value as sent, for urllib's decoder if the fast path can't
        self.tail = b''     # the value's last 6 bytes as sent
        self.carry = b''    # the value's bytes not decoded yet (an escape cut at a piece's end)
        self.decoder = None

    def feed(self, data, start, end):
        if start == end:
            return
        self.fed = True
        if self.name is None:
            equals = data.find(b'=', start, end)
            if equals < 0:
                self.head.append(data[start:end])
                return
            self.head.append(data[start:equals])
            self.name = self.head_text()
            self.decoder = FormDecoder(True)
            start = equals + 1
            if start == end:
                return
        self.raw.append(memoryview(data)[start:end])
        self.tail = (self.tail + data[max(start, end - 6):end])[-6:]
        if self.carry:
            data, start, end = self.carry + data[start:end], 0, len(self.carry) + end - start
        self.carry = data[self.decoder.feed(data, start, end, final=False):end]

    def head_text(self):
        head = b''.join(self.head)
        return form_text(head, 0, len(head))

    def finish(self, params):
        if not self.fed:
            return
        if self.name is None:
            params.add(self.head_text(), '')
            return
        self.decoder.feed(self.carry, 0, len(self.carry), final=True)
        text = self.decoder.text(self.tail)
        params.add(self.name, slow_form_text(b''.join(self.raw)) if text is None else text)


def parse_form_pieces(pieces):
    """The pairs of a form body that arrives in pieces, each decoded as it comes:
    the pairs whole in a piece as parse_urlencoded does, a pair cut between
    pieces (a screenshot spans dozens) by a FormPair."""
    params, pair = Params(), FormPair()
    for piece in pieces:
        start, end = 0, len(piece)
        if pair.fed:
            amp = piece.find(b'&')
            if amp < 0:
                pair.feed(piece, 0, end)
                continue
            pair.feed(piece, 0, amp)
            pair.finish(params)
            pair, start = FormPair(), amp + 1
        last = piece.rfind(b'&', start)
        if last >= 0:
            parse_urlencoded(piece, params, start, last)
            start = last + 1
        pair.feed(piece, start, end)
    pair.finish(params)
    return params


def parse_urlencoded(data, params, start=0, size=None):
    """The pairs in data[start:size] (all of it by default) into params."""
    size = len(data) if size is None else size
    while start < size:
        end = data.find(b'&', start, size)
        end = size if end < 0 else end
        if end > start:
            equals = data.find(b'=', start, end)
            if equals < 0:
                params.add(form_text(data, start, end), '')
            else:
                params.add(form_text(data, start, equals), form_text(data, equals + 1, end))
        start = end + 1


def decode_text(raw):
    """Bytes (or a memoryview of them) as text; bad UTF-8 becomes U+FFFD."""
    return str(raw, 'utf-8', 'replace')


def parse_multipart(body, content_type, params):
    match = re.search(r'boundary="?([^";,]+)"?', content_type)
    if not match:
        raise ApiError(301, '请求格式无效: multipart 缺少 boundary')
    delimiter = b'--' + match.group(1).encode('latin-1')
    start = body.find(delimiter)
    while start >= 0:
        start += len(delimiter)
        end = body.find(delimiter, start)
        stop = len(body) if end < 0 else end
        if body.startswith(b'--', start, stop):
            break
        head_end, gap = body.find(b'\r\n\r\n', start, stop), 4
        if head_end < 0:
            head_end, gap = body.find(b'\n\n', start, stop), 2
        name = re.search(rb'name="([^"]*)"', body[start:head_end], re.I) if head_end >= 0 else None
        if name:
            first = head_end + gap
            if stop - first >= 2 and body.startswith(b'\r\n', stop - 2):
                value = memoryview(body)[first:stop - 2]   # no copy before the text
            else:
                value = body[first:stop].rstrip(b'\n')
            params.add(decode_text(name.group(1)), decode_text(value))
        start = end


def parse_json(body):
    """The JSON object in a body (a JSON string holding one is unwrapped once), or None."""
    try:
        value = json.loads(body)
    except UnicodeDecodeError:
        value = json.loads(decode_text(body))
    if isinstance(value, str):
        value = json.loads(value)
    return value if isinstance(value, dict) else None


def parse_body(body, content_type):
    params = Params()
    if not body:
        return params
    ctype = content_type.lower()
    if ctype.startswith('multipart/'):
        parse_multipart(body, content_type, params)
        return params
    if body.lstrip()[:1] in (b'{', b'"'):
        try:
            params.json = parse_json(body)
        except (ValueError, RecursionError):
            if 'json' in ctype:
                raise ApiError(301, '请求格式无效: JSON') from None
        if params.json is not None:
            for name, value in params.json.items():
                params.add(name, value, from_json=True)
            return params
    if b'=' in body:
        parse_urlencoded(body, params)
    return params


def stated_length(environ, limit):
    """The body's Content-Length (None when chunked or absent), refusing (413) past
    `limit` without holding it in memory."""
    length = (environ.get('CONTENT_LENGTH') or '').strip()
    if not length or 'chunked' in environ.get('HTTP_TRANSFER_ENCODING', '').lower():
        return None
    if not length.isdigit():
        raise ApiError(301, '请求格式无效: Content-Length')
    length = int(length)
    if length > limit:
        drain(environ['wsgi.input'], length)
        raise ApiError(413, '请求体过大')
    return length


def read_body(environ, limit, length):
    """The request body, refusing (413) past `limit` without holding it in memory.

    A body shorter than its Content-Length, or broken chunking, is refused
    whole (and the connection closed): a cut-off URL or log line must not be
    stored as if it were the phone's.
    """
    stream = environ['wsgi.input']
    if length is not None:
        return read_stream(stream, length)
    if 'chunked' not in environ.get('HTTP_TRANSFER_ENCODING', '').lower():
        return b''
    with waiting_on_phone(limit):
        body = read_some(stream, limit + 1)
    if len(body) > limit:
        drain(stream, DRAIN_LIMIT)
        raise ApiError(413, '请求体过大')
    return body


def read_stream(stream, size, body_size=None):
    """Exactly `size` bytes of the body (a shorter body is broken); `body_size`,
    the whole body's, when this is a piece of it."""
    with waiting_on_phone(body_size or size):
        data = read_some(stream, size)
    if len(data) < size:
        raise broken_body()
    return data


def read_some(stream, size):
    try:
        return stream.read(size) if size > 0 else b''
    # A stalled phone (socket timeout), or chunk sizes that are garbage or absurd.
    except (OSError, ValueError, OverflowError, MemoryError):
        raise broken_body() from None


# A form body is parsed as it arrives, in pieces of this size: a screenshot is
# decoded while the rest of it is on its way, and never held whole as sent.
FORM_PIECE = 256 * 1024


def stream_form(stream, length):
    """Params of a form body parsed as it is read, or the body itself when it is JSON.
    The worker counts as waiting on the phone while it reads, not while it decodes."""
    first = read_stream(stream, min(FORM_PIECE, length), length)
    if first.lstrip()[:1] in (b'{', b'"') or not first.strip():
        return first + read_stream(stream, length - len(first), length)

    def pieces():
        yield first
        left = length - len(first)
        while left > 0:
            piece = read_stream(stream, min(FORM_PIECE, left), length)
            left -= len(piece)
            yield piece
    return parse_form_pieces(pieces())


# A body this large may take the phone seconds to send (a screenshot over Wi-Fi);
# smaller ones come with the headers.
SLOW_BODY = 64 * 1024


@contextmanager
def waiting_on_phone(size):
    """Count this worker as waiting on a phone's body while it reads a big one,
    so the pool (Workers) can put another worker on the requests meanwhile."""
    readers = request.environ.get('xhs.readers') if size > SLOW_BODY else None
    if readers is None:
        yield
        return
    readers.append(None)   # list appends and pops are atomic: no lock needed for a count
    try:
        yield
    finally:
        readers.pop()


def broken_body():
    close_connection()
    return ApiError(301, '请求格式无效: 请求体不完整')


def close_connection():
    """Have cheroot close this connection after the answer (its stream can't be trusted)."""
    cheroot_request = request.environ.get('xhs.request')
    if cheroot_request is not None:
        cheroot_request.close_connection = True


def drain(stream, length):
    """Read and drop an oversized body, a chunk at a time, so the phone sees the answer.

    Beyond DRAIN_LIMIT nothing is read: the connection is closed instead (wsgi_app).
    """
    if length > DRAIN_LIMIT:
        return
    with waiting_on_phone(length):
        while length > 0:
            chunk = stream.read(min(CHUNK, length))
            if not chunk:
                break
            length -= len(chunk)


def request_params():
    environ = request.environ
    params = query_params(environ)
    limit = models.settings()['max_body_mb'] * 1024 * 1024
    ctype = environ.get('CONTENT_TYPE', '')
    length = stated_length(environ, limit)
    if length is not None and length > SLOW_BODY and not ctype.lower().startswith('multipart/'):
        body = stream_form(environ['wsgi.input'], length)
        if isinstance(body, Params):
            params.merge(body)
            return params
    else:
        body = read_body(environ, limit, length)
    params.merge(parse_body(body, ctype))
    return params


# --------------------------------------------------------------------------
# Validation helpers
# --------------------------------------------------------------------------

PLACEHOLDERS = {'null', 'none', 'undefined', 'unknown', 'nil'}
MAC_PLACEHOLDER = '02:00:00:00:00:00'


def need(p, name):
    value = p.get(name)
    if value is None:
        raise ApiError(301, MISSING % name)
    return value


def sim_value(value):
    """A usable IMSI/ICCID (5 to 32 ASCII letters or digits, not a placeholder), else None."""
    if value is None or not (5 <= len(value) <= 32 and value.isascii() and value.isalnum()):
        return None
    if value.lower() in PLACEHOLDERS or not value.strip('0'):
        return None
    return value


def need_sim(p):
    values = []
    for name in ('imsi', 'iccid'):
        value = need(p, name)
        if sim_value(value) is None:
            raise ApiError(301, INVALID % name)
        values.append(value)
    return values


def mac_value(value):
    """(normalised MAC or None, valid?). The Android placeholder is valid but unknown."""
    if value is None:
        return None, True
    digits = re.sub(r'[\s:\-.]', '', value).lower()
    if not re.fullmatch(r'[0-9a-f]{12}', digits):
        return None, False
    mac = ':'.join(digits[i:i + 2] for i in range(0, 12, 2))
    return (None if mac == MAC_PLACEHOLDER or mac == '00:00:00:00:00:00' else mac), True


def int_value(p, name, default=None, low=None, high=None):
    value = p.get(name)
    if value is None:
        if default is None:
            raise ApiError(301, MISSING % name)
        return default
    number = whole_number(value)
    low = -models.SQL_INT if low is None else low
    high = models.SQL_INT if high is None else high
    if number is None or not low <= number <= high:
        raise ApiError(301, INVALID % name)
    return number


def whole_number(text):
    """An int from `12`, `12.0` or ` 12 `; None for anything else."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        number = float(text)
    except ValueError:
        return None
    return int(number) if number.is_integer() else None


def phone_type_value(p):
    value = p.get('phone_type')
    return int(value) if value in ('1', '2') else None


def parse_time(value):
    """Epoch seconds from epoch seconds/milliseconds or a local `YYYY-MM-DD[ T]HH:MM[:SS]`."""
    value = value.strip()
    if re.fullmatch(r'\d{1,20}(\.\d{1,9})?', value):
        number = float(value)
        return models.plausible_time(number / 1000 if number > 1e11 else number)
    # Phones add milliseconds or a zone after the seconds, or write the date with '/'.
    return models.plausible_time(models.local_time(value.replace('/', '-')[:19]))


def current_phone(p, waiting=None):
    """The calling phone by its SIM, registered on first sight; refused while unapproved.

    `waiting`: a task kind; the row then says whether one may be there for it.
    """
    imsi, iccid = need_sim(p)
    mac, _ = mac_value(p.get('macaddr'))
    phone = models.phone_for(imsi, iccid, mac=mac, phone_type=phone_type_value(p),
                             approved=not app.config['xhs.approve_new'], waiting=waiting)
    require_approved(phone)
    models.touch(phone, request.environ.get('REMOTE_ADDR'))
    return phone


def optional_phone(p):
    """The phone when the request names a usable SIM, else None."""
    if sim_value(p.get('imsi')) and sim_value(p.get('iccid')):
        return current_phone(p)
    return None


def next_task(p, kind):
    """The calling phone's next task of this kind; none for a phone set offline."""
    phone = current_phone(p, waiting=kind)
    if phone['offline'] or not phone['waiting']:
        return None
    return models.claim_next(kind, phone['id'], phone['xhs_id'])


@contextmanager
def refusals(missing='任务不存在'):
    """The model's NotFound and Conflict, as the contract's 301 answers."""
    try:
        yield
    except NotFound:
        raise ApiError(301, missing) from None
    except Conflict:
        raise ApiError(301, '状态冲突') from None


def require_approved(phone):
    if not phone['approved']:
        raise ApiError(403, '禁止访问: 手机待批准')


def base_url():
    environ = request.environ
    host = environ.get('HTTP_HOST') or '%s:%s' % (environ.get('SERVER_NAME', 'localhost'),
                                                   environ.get('SERVER_PORT', '80'))
    return '%s://%s' % (environ.get('wsgi.url_scheme', 'http'), host)


def media_url(name):
    return '%s/media/%s' % (base_url(), name)


def image_urls(images_json):
    return [media_url(item[6:]) if item.startswith('media:') else item
            for item in models.parse_json_list(images_json)]


# --------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------

# URL-safe alphabet to standard; a space is a '+' that was sent unescaped; line
# breaks and other whitespace go.
_STANDARD = str.maketrans('-_ ', '+/+', '\r\n\t\x0b\x0c')
_DATA_PREFIX = re.compile(r'^data:[^,]{0,100};base64,', re.I)


def decode_image(value, field='img_base64_data'):
    """Bytes of a base64 image in any of the variants phones send (API.md §3).

    Works on the text as parsed (pybase64 reads ASCII text without a copy),
    and tries it as standard padded base64 first, the way most phones send it.
    """
    if not value.isascii():
        raise ApiError(301, INVALID % field)
    if value[:5].lower() == 'data:':
        value = _DATA_PREFIX.sub('', value, count=1)
    try:
        data = pybase64.b64decode(value, validate=True) if len(value) % 4 == 0 else None
    except binascii.Error:
        data = None
    if data is None:
        data = decode_variant(value, field)
    if len(data) > models.settings()['max_image_mb'] * 1024 * 1024:
        raise ApiError(413, '图片过大')   # the body limit bounded the decoding
    if models.image_type(data) is None:
        raise ApiError(301, INVALID % field + ' (不是 PNG/JPEG/WebP/GIF 图片)')
    if not models.image_complete(data):
        raise ApiError(301, INVALID % field + ' (图片不完整)')
    return data


def decode_variant(value, field):
    """Base64 in the URL-safe alphabet, with breaks or spaces in it, or unpadded."""
    value = value.translate(_STANDARD)
    if len(value) % 4:   # padding missing (or wrong): restore it; a padded body is used as is
        value = value.rstrip('=')
        if len(value) % 4 == 1:
            raise ApiError(301, INVALID % field)
        value += '=' * (-len(value) % 4)
    try:
        return pybase64.b64decode(value, validate=True)
    except binascii.Error:
        raise ApiError(301, INVALID % field) from None


def save_screenshots(values, phone, kind, counterpart=''):
    """Decode every image first (nothing stored if one is bad), then store each once
    as the phone's screenshot; their file names."""
    limit = models.settings()['max_images']
    if len(values) > limit:
        raise ApiError(301, INVALID % 'img_base64_data' + ' (最多 %d 张)' % limit)
    images = [decode_image(value) for value in values]
    return models.store_images(images, screenshots=(phone['id'], kind, counterpart))


# --------------------------------------------------------------------------
# Access
# --------------------------------------------------------------------------

_allowed_cache = {}


def address_allowed(address):
    allowed = _allowed_cache.get(address)
    if allowed is None:
        try:
            ip = ipaddress.ip_address((address or '').split('%')[0])
        except ValueError:
            return False
        if ip.version == 6 and ip.ipv4_mapped:
            ip = ip.ipv4_mapped
        allowed = any(ip in net for net in app.config['xhs.allow'] if net.version == ip.version)
        if len(_allowed_cache) < 10000:
            _allowed_cache[address] = allowed
    return allowed


def check_address():
    if app.config['xhs.allow'] is None:
        configure()
    if not address_allowed(request.environ.get('REMOTE_ADDR')):
        raise ApiError(403, '禁止访问')


def check_token(p):
    token = app.config['xhs.token']
    if not token:
        return
    environ = request.environ
    given = p.get('token') if p is not None else None
    given = given or environ.get('HTTP_X_TOKEN') or ''
    auth = environ.get('HTTP_AUTHORIZATION', '')
    if not given and auth[:7].lower() == 'bearer ':
        given = auth[7:].strip()
    if not hmac.compare_digest(given.encode('utf-8'), token.encode('utf-8')):
        raise ApiError(401, '未授权')


# --------------------------------------------------------------------------
# Dispatch
# --------------------------------------------------------------------------

HANDLERS = {}


def api(group, *actions):
    """Register a handler for `group/action` (and any alias actions)."""
    def register(func):
        for action in actions:
            HANDLERS[(group, action)] = func
        return func
    return register


def endpoint(path):
    """(group, action) of a phone path, tolerating /api_hurong, /<digits> and a trailing /."""
    parts = [part for part in path.split('/') if part]
    if parts and parts[0] == PREFIX:
        parts = parts[1:]
    if len(parts) == 3 and parts[2].isdigit():
        parts = parts[:2]
    return tuple(parts) if len(parts) == 2 else None


def guarded(handler):
    """Run a handler; every outcome becomes the JSON envelope (HTTP 200)."""
    started = time.perf_counter()
    try:
        check_address()
        body = handler()
    except ApiError as error:
        body = envelope(error.code, error.msg, error.data)
    except peewee.OperationalError as error:
        if 'locked' in str(error) or 'busy' in str(error):
            body = envelope(503, '服务繁忙，请稍后重试')
        elif 'full' in str(error):   # SQLite: database or disk is full
            body = storage_full(error)
        elif 'disk I/O error' in str(error):   # a failing disk, or a file size limit
            body = storage_full(error, '服务器存储故障，请稍后重试')
        else:
            body = internal_error()
    except OSError as error:
        body = storage_full(error) if error.errno in STORAGE_FULL else internal_error()
    except Exception:
        body = internal_error()
    if app.config['xhs.access_log']:
        # Path only: query strings carry phone numbers and tokens.
        log.info('%s %s %s %s %.1fms', request.environ.get('REMOTE_ADDR'), request.method,
                 request.path, body[8:body.index(b',')].decode(), (time.perf_counter() - started) * 1000)
    return answer(body)


STORAGE_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def storage_full(error, msg='服务器存储空间不足，请稍后重试'):
    """The disk (or a quota or file size limit) is full, or failing: the phone may try
    again later; the operator reads one line in the log, not a traceback."""
    log.error('request %s %s: cannot store: %s', request.method, request.path, error)
    return envelope(503, msg)


def internal_error():
    log.error('request %s %s failed\n%s', request.method, request.path, traceback.format_exc())
    return envelope(500, '服务器内部错误')


def phone_api(path):
    handler = HANDLERS.get(endpoint(path))

    def run():
        if request.method not in ('GET', 'POST'):
            raise ApiError(402, '请求异常')   # a HEAD must not claim a task it cannot deliver
        p = request_params()
        check_token(p)
        if handler is None:
            raise ApiError(402, '请求异常')
        return handler(p)
    return guarded(run)


def json_error(error):
    """Bottle's own errors (bad request lines, unknown methods) as the envelope too."""
    response.content_type = JSON_TYPE
    if error.status_code == 404:
        return envelope(404, '文件不存在')
    if error.status_code >= 500:
        log.error('unhandled error: %s', error.traceback or error.body)
        return envelope(500, '服务器内部错误')
    return envelope(402, '请求异常')


app.default_error_handler = json_error


# --------------------------------------------------------------------------
# Group xhs_phone_log
# --------------------------------------------------------------------------

@api('xhs_phone_log', 'add')
def log_add(p):
    """Keep the line whatever the metadata; it identifies a phone only when valid."""
    msg = need(p, 'log_msg')
    phone = None
    imsi, iccid = sim_value(p.get('imsi')), sim_value(p.get('iccid'))
    mac, _ = mac_value(p.get('macaddr'))
    kind = phone_type_value(p)
    approved = not app.config['xhs.approve_new']
    if imsi and iccid:
        phone = models.phone_for(imsi, iccid, mac=mac, phone_type=kind, approved=approved)
    elif mac and kind == 1:
        phone = models.phone_for(mac=mac, phone_type=1, approved=approved)
    remote = request.environ.get('REMOTE_ADDR')
    models.add_log(msg, phone and phone['id'], p.get('macaddr'), p.get('ip_addr'),
                   p.get('imsi'), p.get('iccid'), p.get('phone_type'), remote)
    if phone:
        require_approved(phone)
        models.touch(phone, remote)
    return ok(msg='日志纪录成功')


# --------------------------------------------------------------------------
# Group xiaohongshu_userprofile
# --------------------------------------------------------------------------

@api('xiaohongshu_userprofile', 'update_userinfo')
def update_userinfo(p):
    fields = {name: need(p, name) for name in ('phone_num', 'imsi', 'iccid', 'name',
                                               'xiaohongshu_id', 'home_url', 'macaddr', 'platform')}
    number = models.normalize_number(fields['phone_num'])
    if number is None:
        raise ApiError(301, INVALID % 'phone_num')
    mac, valid = mac_value(fields['macaddr'])
    if not valid:
        raise ApiError(301, INVALID % 'macaddr')
    platform = int_value(p, 'platform', low=0, high=10 ** 6)
    phone = current_phone(p)
    models.update_account(phone['id'], number, fields['name'], fields['xiaohongshu_id'],
                          fields['home_url'], mac, platform)
    return ok(msg='更新成功')


@api('xiaohongshu_userprofile', 'update_reading_update_time')
def update_reading_update_time(p):
    models.stamp_reading(current_phone(p)['id'])
    return ok(msg='修改成功')


@api('xiaohongshu_userprofile', 'is_update_userinfo')
def is_update_userinfo(p):
    phone = current_phone(p)
    return ok({'is_update': phone['xhs_id'] is None or bool(phone['refresh_profile'])}, '查询成功')


@api('xiaohongshu_userprofile', 'check_updated_today')
def check_updated_today(p):
    phone = current_phone(p)
    return ok({'flag': models.needs_reading_update(phone['reading_at'])}, '查询成功')


# --------------------------------------------------------------------------
# Group xiaohongshu_biji (notes to publish)
# --------------------------------------------------------------------------

@api('xiaohongshu_biji', 'get_release_task')
def get_release_task(p):
    task = next_task(p, models.RELEASE)
    if task is None:
        return nothing()
    data = {'id': task['id'], 'content': task['content'], 'platform': task['platform']}
    if task['title']:
        data['title'] = task['title']
    if task['images']:
        data['images'] = image_urls(task['images'])
    if task['topics']:
        data['topics'] = models.parse_json_list(task['topics'])
    return ok(data, '获取成功')


def task_id_value(p, name='task_id'):
    return int_value(p, name, low=1, high=models.SQL_INT)


@api('xiaohongshu_biji', 'upload_url')
def upload_url(p):
    task_id = task_id_value(p)
    url = need(p, 'url')
    if not re.match(r'^https?://[^/\s?#]+', url, re.I):
        raise ApiError(301, INVALID % 'url')
    phone = optional_phone(p)
    with refusals():
        models.complete_release(task_id, url, phone and phone['id'])
    return ok(msg='提交成功')


# --------------------------------------------------------------------------
# Group xiaohongshu_direct_essages (direct messages)
# --------------------------------------------------------------------------

@api('xiaohongshu_direct_essages', 'save_screenshots')
def save_dm_screenshot(p):
    phone = current_phone(p)
    name = need(p, 'name')
    need(p, 'img_base64_data')
    stored = save_screenshots(p.getall('img_base64_data')[:1], phone, 'dm', name)[0]
    return ok({'key': media_url(stored)}, '保存成功')


@api('xiaohongshu_direct_essages', 'get_reply')
def get_reply(p):
    task = next_task(p, models.REPLY)
    if task is None:
        return nothing()
    return ok({'id': task['id'], 'name': task['name'], 'msg': task['content'],
               'platform': task['platform']}, '获取成功')


@api('xiaohongshu_direct_essages', 'reply_save')
def reply_save(p):
    with refusals():
        models.complete_task(task_id_value(p), models.REPLY)
    return ok(msg='操作完成')


@api('xiaohongshu_direct_essages', 'get_screenshot_time')
def get_screenshot_time(p):
    phone = current_phone(p)
    return ok({'screenshot_time': models.rest_minutes(phone['rest_day'], phone['rest_night'])},
              '查询成功')


# --------------------------------------------------------------------------
# Group xhs_phone_management
# --------------------------------------------------------------------------

@api('xhs_phone_management', 'get_phone_work_status')
def get_phone_work_status(p):
    """Asked by the phone's watchdog; not itself activity."""
    kind = int_value(p, 'phone_type', low=1, high=2)
    if kind == 1 and not (sim_value(p.get('imsi')) and sim_value(p.get('iccid'))):
        mac, valid = mac_value(need(p, 'macaddr'))
        if mac is None:
            raise ApiError(301, INVALID % 'macaddr')
        phone = models.find_phone_by_mac(mac)
    else:
        imsi, iccid = need_sim(p)
        phone = models.find_phone_by_sim(imsi, iccid)
    if phone is None:
        raise ApiError(301, '该手机不存在')
    require_approved(phone)
    if phone['offline']:
        reason = '已被设为离线'
    elif not models.is_active(phone['last_seen']):
        reason = '超过%d分钟无活动' % models.settings()['activity_window']
    else:
        reason = ''
    return ok({'flag': bool(reason), 'reason': reason,
               'last_seen': models.fmt_time(phone['last_seen'])},
              '查询成功', note={'flag': '如果为True 则异常'})


@api('xhs_phone_management', 'get_phone_number')
def get_phone_number(p):
    phone = current_phone(p)
    number = models.number_for(phone['id'], p.get('iccid'))
    if number is None:
        return ok({'phone_number': ''}, '暂无可用手机号')
    return ok({'phone_number': number}, '查询成功')


@api('xhs_phone_management', 'get_verification_code')
def get_verification_code(p):
    number = models.normalize_number(need(p, 'phone_number'))
    if number is None:
        raise ApiError(301, INVALID % 'phone_number')
    since = None
    if p.get('since') is not None:
        since = parse_time(p.get('since'))
        if since is None:
            raise ApiError(301, INVALID % 'since')
    found = models.latest_code(number, since)
    if found is None:
        raise ApiError(301, '暂无验证码')
    return ok({'verification_code': found[0], 'yzm_time': models.fmt_time(found[1], 'T')},
              '查询成功')


@api('xhs_phone_management', 'get_xhs_unregistered_information')
def get_xhs_unregistered_information(p):
    count = int_value(p, 'get_info_number', default=1, low=1, high=50)
    phone = optional_phone(p)
    try:
        profiles, available = models.reserve_profiles(count, phone and phone['id'])
    except NotEnough as short:
        raise ApiError(301, '当前未注册小红书账号低于%d条, 剩余%d条' % (count, short.available)) from None
    for profile in profiles:
        profile['gender'] = profile['gender'] or ('男' if profile['gender_id'] == 1 else '女')
    return ok({'ret_data': profiles, 'count': available}, '查询成功')


# --------------------------------------------------------------------------
# Group DMS_screenshots (comment moderation); the earlier server's
# comment_management/<op> paths answer too, with its names.
# --------------------------------------------------------------------------

COMMENTS = ('DMS_screenshots', 'comment_management')
COMMENT_FIELDS = ('head_portrait', 'nick_name', 'comments_status', 'comments_content',
                  'article_picture_address', 'screenshots_address')


def comment_api(*actions):
    def register(func):
        for group in COMMENTS:
            api(group, *actions)(func)
        return func
    return register


@comment_api('save_screenshots')
def save_article_screenshots(p):
    if 'comments_content' in p:
        return add_comment(p)
    phone = current_phone(p)
    need(p, 'img_base64_data')
    names = save_screenshots(p.getall('img_base64_data'), phone, 'article')
    urls = [media_url(name) for name in names]
    return ok({'key': urls[0], 'keys': urls}, '提交成功')


@comment_api('add_comment', 'mobile_phone_reviews')
def add_comment(p):
    phone = current_phone(p)
    fields = {name: need(p, name) for name in COMMENT_FIELDS}
    if p.get('article_notes_id') is not None:
        fields['article_notes_id'] = task_id_value(p, 'article_notes_id')
    comment_id, created = models.add_comment(phone['id'], fields)
    return ok({'id': comment_id}, '创建成功' if created else '重复评论')


@comment_api('query_reply_task')
def query_reply_task(p):
    if p.get('task_type') == 'delete':
        return query_delete_task(p)
    task = next_task(p, models.COMMENT_REPLY)
    if task is None:
        return nothing('无任务')
    row = models.comment_reply_task(task['id'])
    keys = ('id', 'comment_type', 'comments_content', 'nick_name', 'article_picture_address',
            'screenshots_address', 'platform', 'comment_response', 'create_datetime', 'comment_id',
            'comments_status')
    data = dict(zip(keys, row))
    data['create_datetime'] = models.fmt_time(data['create_datetime'])
    return ok(data, '查询成功')


@comment_api('reply_comment_is_success')
def reply_comment_is_success(p):
    if 'notes_url' in p and 'comment_id' not in p:
        return associate_notes(p)
    task_id = task_id_value(p, 'comment_id')
    done_at = None
    if p.get('comment_completion_time') is not None:
        done_at = parse_time(p.get('comment_completion_time'))
        if done_at is None:
            raise ApiError(301, INVALID % 'comment_completion_time')
    with refusals():
        models.complete_task(task_id, models.COMMENT_REPLY, done_at)
    return ok(msg='成功')


@comment_api('query_delete_task', 'query_delete_comment')
def query_delete_task(p):
    phone = current_phone(p)
    row = None if phone['offline'] else models.next_delete(phone['id'])
    if row is None:
        return nothing('无任务')
    comment_id, content, shot, nick, label, account, platform, imsi = row
    return ok({'id': comment_id, 'comments_content': content, 'screenshots_address': shot,
               'phone_name': label or imsi, 'user_name': nick, 'blogger_name': account or '',
               'platform': platform or 1}, '查询成功')


def delete_report(p, outcome, msg):
    with refusals('评论不存在'):
        models.report_delete(task_id_value(p, 'comment_id'), outcome)
    return ok(msg=msg)


@comment_api('reply_comment_is_delete')
def reply_comment_is_delete(p):
    return delete_report(p, models.DEL_DONE, '操作完成')


@comment_api('comment_post_exception_instead')
def comment_post_exception_instead(p):
    return delete_report(p, models.DEL_FAILED, '删除异常成功')


@comment_api('associate_notes', 'associated_screenshots')
def associate_notes(p):
    url, shot = need(p, 'notes_url'), need(p, 'screenshots')
    with refusals('笔记不存在'):
        note, created = models.link_note(url, shot)
    return ok({'biji_id': note}, '关联成功' if created else '重复关联')


@comment_api('determine_correlation')
def determine_correlation(p):
    note = models.linked_note(need(p, 'screenshots'))
    return ok({'flag': note is not None, 'biji_id': note}, '查询完成')


# --------------------------------------------------------------------------
# SMS intake (API.md §5)
# --------------------------------------------------------------------------

SMS_TEXT = ('content', 'text', 'msg', 'message', 'body')
SMS_RECEIVER = ('phone_number', 'to', 'receiver')


def first_of(p, names):
    return next((p.get(name) for name in names if p.get(name) is not None), None)


def sms_fields(p):
    """(receiver, text, sender, sent_at) from a forwarder's flat or nested webhook."""
    payload = (p.json or {}).get('payload')
    if isinstance(payload, dict):
        nested = Params()
        for name, value in payload.items():
            nested.add(name, value, from_json=True)
        text, sender = nested.get('message'), nested.get('phoneNumber')
        sent = nested.get('receivedAt')
    else:
        text, sender = first_of(p, SMS_TEXT), first_of(p, ('from', 'sender'))
        sent = first_of(p, ('timestamp', 'time', 'sent_at', 'receivedAt'))
    return first_of(p, SMS_RECEIVER), text, sender, sent and parse_time(sent)


@app.route('/sms/receive', method=['GET', 'POST'])
@app.route('/sms/receive/', method=['GET', 'POST'])
def sms_receive():
    def run():
        p = request_params()
        check_token(p)
        receiver, text, sender, sent_at = sms_fields(p)
        if receiver is None:
            raise ApiError(301, MISSING % 'phone_number')
        number = models.normalize_number(receiver)
        if number is None:
            raise ApiError(301, INVALID % 'phone_number')
        if text is None:
            raise ApiError(301, MISSING % 'content')
        sms_id, code, stored = models.add_code(number, text, sender=sender, sent_at=sent_at)
        return ok({'id': sms_id, 'has_code': code is not None, 'duplicate': not stored}, '接收成功')
    return guarded(run)


# --------------------------------------------------------------------------
# Media, health, and everything else
# --------------------------------------------------------------------------

@app.route('/media/<name:path>', method=['GET', 'HEAD'])
def media(name):
    def run():
        check_token(query_params(request.environ))
        if not models.MEDIA_NAME_RE.match(name):
            raise ApiError(404, '文件不存在')
        path = os.path.join(models.media_dir(), name)
        if not os.path.isfile(path):
            raise ApiError(404, '文件不存在')
        return bottle.static_file(name, root=models.media_dir())
    try:
        check_address()
        return run()
    except ApiError as error:
        return answer(envelope(error.code, error.msg), 404 if error.code == 404 else 200)


def query_params(environ):
    """Parameters of the query string (WSGI hands it over as latin-1 text of the raw bytes)."""
    params = Params()
    query = environ.get('QUERY_STRING', '')
    if query.isascii() and '%' not in query and '+' not in query:
        for pair in query.split('&'):   # a poll's plain query: nothing to decode
            name, _, value = pair.partition('=')
            params.add(name, value)
    else:
        parse_urlencoded(query.encode('latin-1', 'replace'), params)
    return params


@app.route('/healthz', method=['GET', 'HEAD'])
def healthz():
    def run():
        try:
            models.db.execute_sql('SELECT 1').fetchone()
            state = 'ok'
        except peewee.DatabaseError as error:
            state = str(error)
        data = {'version': __version__, 'db': state}
        return envelope(200, 'ok', data) if state == 'ok' else envelope(503, '数据库不可用', data)
    return guarded(run)


@app.route('/<path:path>', method='ANY')
@app.route('/', method='ANY')
def any_path(path=''):
    return phone_api(path)


# --------------------------------------------------------------------------
# Serving
# --------------------------------------------------------------------------

def lan_address():
    """The address phones on the LAN would use to reach this machine (best guess)."""
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.connect(('192.168.255.255', 9))  # no packet is sent; it picks a route
        return probe.getsockname()[0]
    except OSError:
        return '127.0.0.1'
    finally:
        probe.close()


def wsgi_app(environ, start_response):
    """The app as cheroot runs it.

    cheroot reads whatever body the app left unread into memory before it
    answers (to keep the connection alive); for a big unread body (a refused
    upload, a stranger's request) the connection is closed instead.
    """
    result = app(environ, start_response)
    request_ = environ.get('xhs.request')
    if request_ is not None and getattr(environ['wsgi.input'], 'remaining', 0) > UNREAD_LIMIT:
        request_.close_connection = True
    return result


class Workers:
    """Keeps `core` workers free for answering, and one more for each worker that
    waits on a phone's big body (a screenshot over Wi-Fi), up to the pool's max.

    Requests are mostly Python under one lock (the GIL): a few workers answer
    them fastest, and every extra runnable thread only adds turns at that lock
    (24 workers served polls 5 to 10 % slower than 8 here, with p99 several times
    longer). A worker waiting on a slow upload takes no turns, so it is replaced
    while it waits. Extra workers leave when they have not been needed for
    LINGER seconds. Only the pool's size depends on this; nothing's correctness.
    """
    CHECK = 0.05    # seconds between looks at the readers' count
    LINGER = 5.0    # seconds of surplus before extra workers are let go

    def __init__(self, pool, core):
        self.pool, self.core = pool, core
        self.readers = []   # one entry per worker reading a big body (waiting_on_phone)
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self.run, name='xhs-workers', daemon=True)

    def size(self):
        # cheroot's pool keeps its workers in _threads; those told to leave are
        # counted in _pending_shutdowns until they have.
        return len(self.pool._threads) - len(self.pool._pending_shutdowns)

    def run(self):
        surplus_since = None
        while not self.stopped.wait(self.CHECK):
            want, have = self.core + len(self.readers), self.size()
            if want > have:
                self.pool.grow(want - have)   # grow() stops at the pool's max
                surplus_since = None
            elif want < have:
                at = time.monotonic()
                surplus_since = surplus_since or at
                if at - surplus_since >= self.LINGER:
                    self.pool.shrink(have - want)   # shrink() stops at the pool's min
                    surplus_since = None
            else:
                surplus_since = None

    def stop(self):
        self.stopped.set()
        if self.thread.is_alive():
            self.thread.join(5)


ACCEPT_BATCH = 256   # new connections taken in one turn of the selector loop, at most


def make_server(host, port, threads=8, max_threads=64, timeout=60):
    """A cheroot server for the app, tuned for a few hundred phones on Wi-Fi.

    `threads` workers answer requests; while some wait on phones' uploads,
    others are added in their place, up to `max_threads` in all (Workers).
    """
    from cheroot import wsgi

    class Gateway(wsgi.Gateway_10):
        def get_environ(self):
            environ = super().get_environ()
            environ['xhs.request'] = self.req
            environ['xhs.readers'] = self.req.server.workers.readers
            return environ

    class Server(wsgi.Server):
        def prepare(self):
            super().prepare()
            self.workers.thread.start()
            # cheroot takes one new connection per turn of its selector loop, and
            # a turn under load waits for Python's lock: 200 phones connecting at
            # once waited up to 2 s for their first answer. Every connection
            # waiting in the backlog is taken at once instead; the listening
            # socket no longer blocks, so the last accept() finds none and returns.
            self.socket.setblocking(False)
            manager = self._connections
            accept = manager._from_server_socket

            def accept_waiting(server_socket):
                first = accept(server_socket)
                for _ in range(ACCEPT_BATCH if first is not None else 0):
                    conn = accept(server_socket)
                    if conn is None:
                        break
                    self.process_conn(conn)
                return first
            manager._from_server_socket = accept_waiting

        def stop(self):
            self.workers.stop()   # first, so the pool does not grow while it stops
            super().stop()

        def process_conn(self, conn):
            # cheroot hands a new connection straight to a worker, which then
            # waits for its first bytes. It waits in the selector instead (put()
            # passes it on at once when bytes are already there), so clients
            # that connect and say nothing yet do not hold the workers.
            if conn.last_used is None:
                self._connections.put(conn)
            else:
                super().process_conn(conn)

        keep_alive_checked, keep_alive_allowed = 0.0, True

        @property
        def can_add_keepalive_connection(self):
            # cheroot counts the open connections, under its selector's lock, for
            # every answer: a sixth of the time a poll holds the GIL. Counting
            # every 100 ms enforces keep_alive_conn_limit as well, give or take
            # the connections of 100 ms.
            now = time.monotonic()
            if now - self.keep_alive_checked > 0.1:
                self.keep_alive_allowed = super().can_add_keepalive_connection
                self.keep_alive_checked = now
            return self.ready and self.keep_alive_allowed

    server = Server((host, port), wsgi_app, numthreads=threads, max=max(threads, max_threads),
                    timeout=timeout, request_queue_size=1024, server_name='xhs-server')
    server.gateway = Gateway
    server.workers = Workers(server.requests, threads)
    server.max_request_body_size = 0  # the app enforces the limit and answers with the envelope
    # Headers and request line: room for a screenshot sent in a query string, no more.
    server.max_request_header_size = 16 * 1024 * 1024
    # cheroot keeps only 10 idle keep-alive connections by default and closes the
    # rest; a phone's OkHttp then resends its next POST on a dead connection.
    server.keep_alive_conn_limit = 4096
    return server


def limit_malloc_arenas(arenas=2):
    """Keep glibc from giving each of dozens of threads its own memory pool.

    Every worker that decodes a 4 MB upload would otherwise keep its freed
    buffers in a pool of its own (RSS near 100 MB after a thousand uploads;
    under 70 MB with two pools). Elsewhere than glibc this does nothing.
    """
    try:
        import ctypes
        ctypes.CDLL('libc.so.6').mallopt(-8, arenas)   # M_ARENA_MAX
    except (OSError, AttributeError):
        pass


def serve(server, on_ready=None, watch=None):
    """Run until Ctrl-C or SIGTERM; then stop accepting, finish, and close.

    `watch`: the background Monitor (activity history, alerts, retention), if any.
    """
    def stop(signum, frame):
        raise KeyboardInterrupt
    previous = signal.signal(signal.SIGTERM, stop)
    limit_malloc_arenas()
    server.prepare()
    if watch:
        watch.start()
    if on_ready:
        on_ready(server.bind_addr)
    try:
        server.serve()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
        if watch:
            watch.stop()
        signal.signal(signal.SIGTERM, previous)


def setup_logging(stream=None):
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(logging.Formatter('%(asctime)s %(levelname)s %(message)s', '%Y-%m-%d %H:%M:%S'))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
