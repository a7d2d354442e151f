"""xhs-server simulate: virtual phones that play a phone script's day against a server.

    xhs-server simulate --url http://127.0.0.1:8000 --phones 5 --seconds 30 --seed-work --db ./data/xhs.db

Each phone is a thread with its own SIM (IMSI, ICCID) and MAC, derived from the
seed, and its own script style: how its requests go on the wire (OkHttp forms,
http.postJson, python-requests multipart, base64 variants, the /api_hurong
prefix, a /0 suffix, the earlier server's path names), as the phones in the
field send them (API.md, tests/samples). A phone's working day (SIM_DAY) is
compressed into the run, so rests and polls are short.

The simulator checks the promises of the contract that a phone can see and
exits 1 when the server broke one: an HTTP status other than 200, an answer
that is not the JSON envelope, a task handed to two phones, a task handed out
again after its completion was answered 200, a phone number bound to two SIMs,
a code 500, or a valid request refused. Legitimate answers (301 `暂无验证码`
while polling, `当前无任务`, 503 busy) are counted, never flagged.

Only the standard library is used, so it runs from any machine with Python.
The operator's side is not simulated unless --seed-work is given; then the
simulator queues work by running the operator CLI against --db.
"""
import base64
import collections
import concurrent.futures
import gzip
import http.client
import json
import os
import random
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import zlib

import click

SIM_DAY = 8 * 3600        # the simulated working day a run is compressed into (seconds)
REQUEST_TIMEOUT = 30      # seconds, as OkHttp under Auto.js waits
RESENDS = 3               # OkHttp resends an identical request up to 3 more times
EXAMPLES_PER_KIND = 3     # violation/error examples kept per (kind, endpoint)

# --------------------------------------------------------------------------
# What phones say and see (Chinese, as the studio's scripts log it)
# --------------------------------------------------------------------------

NOTES = [
    ('秋天的第一杯奶茶｜附自制教程🍂', '降温了，给自己煮一杯暖暖的奶茶吧～ 做法超简单', ['秋天的第一杯奶茶', '奶茶教程']),
    ('通勤穿搭｜一周不重样', '小个子女生的通勤穿搭分享，简单又显高✨', ['通勤穿搭', '小个子穿搭']),
    ('周末去哪儿｜城市公园野餐', '天气太好啦，带上野餐垫出发🧺 记得带防晒', ['周末去哪儿', '野餐']),
    ('租房改造｜500元焕新小卧室', '花小钱改造出租屋，温馨又治愈🏠', ['租房改造', '好物分享']),
    ('减脂餐｜十分钟快手便当', '上班族也能坚持的减脂便当🥗 一周食谱见图', ['减脂餐', '便当']),
    ('读书笔记｜这本书让我学会慢下来', '分享最近在读的一本书，适合睡前读📖', ['读书笔记']),
]
PROFILE_NAMES = ['小美的日常', '阿杰爱做饭', '晴天的碎碎念', '橙子不吃橙', '一杯清茶', '周末小确幸',
                 '林间小鹿', '南风知我意']
COMMENTERS = ['爱喝奶茶的猫', '小鹿乱撞', '今天也要加油鸭', '橘子汽水', '路过的风', '星星不眨眼',
              '柠檬不酸', '一只小熊']
COMMENT_TEXTS = ['请问这个在哪里买？', '求链接！', '好好看，已收藏', '博主好会拍～', '这个颜色绝了',
                 '学到了，谢谢分享', '可以出个详细教程吗？', '蹲一个后续']
DM_NAMES = ['路人甲', '小张同学', '奶茶爱好者', '追光的人', '晚风']
DM_REPLIES = ['您好，已收到～ 稍后发您链接', '感谢关注！详情看主页置顶哦', '好的呢，已经给您整理好啦']
COMMENT_REPLIES = ['谢谢喜欢～ 链接在主页', '在主页置顶笔记里哦～', '感谢支持，会继续更新的！']
SMS_TEXT = '【小红书】验证码 {code}，用于手机号登录，5分钟内有效，请勿泄露。'
SMS_SENDER = '1069000000000'
SCRIPT_VERSION = 'v2.3.1'

# --------------------------------------------------------------------------
# Endpoints: canonical names, the paths each script dialect uses, normal codes
# --------------------------------------------------------------------------

# The earlier server's names for the comment operations (API.md, DMS_screenshots).
LEGACY_NAMES = {'add_comment': 'mobile_phone_reviews', 'associate_notes': 'associated_screenshots',
                'query_delete_task': 'query_delete_comment'}
# The document's wrong paths, which dispatch by their parameters.
DOCUMENT_PATHS = {'add_comment': ('save_screenshots', {}),
                  'associate_notes': ('reply_comment_is_success', {}),
                  'query_delete_task': ('query_reply_task', {'task_type': 'delete'})}

# Codes an endpoint may answer to a well-formed request; anything else is looked at.
NORMAL_CODES = {
    'xhs_phone_management/get_xhs_unregistered_information': {200, 301},  # fewer profiles than asked
    'xhs_phone_management/get_verification_code': {200, 301},             # 暂无验证码: keep polling
}
# Completions may be refused legitimately after an operator requeued or cancelled
# the task, so a 301 there is an error to look at, not a broken promise.
COMPLETIONS = {'xiaohongshu_biji/upload_url', 'xiaohongshu_direct_essages/reply_save',
               'DMS_screenshots/reply_comment_is_success', 'DMS_screenshots/reply_comment_is_delete',
               'DMS_screenshots/comment_post_exception_instead'}
# Codes that depend on how the server is configured (busy, token, approval, limits).
SETUP_CODES = {503: 'busy (503)', 401: 'token required (401)', 403: 'refused (403)',
               413: 'too large (413)'}

TASK_KINDS = ('release', 'dm_reply', 'comment_reply', 'comment_delete')


# --------------------------------------------------------------------------
# Images: real PNG and baseline JPEG screenshots, a few hundred KB each
# --------------------------------------------------------------------------

WHITE, RED, NAV, DARK = (255, 255, 255), (255, 36, 66), (248, 248, 248), (34, 34, 34)
PHOTO_TINTS = [(190, 140, 110), (120, 150, 180), (160, 180, 120), (200, 170, 150)]


def screen_bands(rng, height, photo_units):
    """A phone screenshot top to bottom in 8-pixel units: (kind, units, colour)."""
    units = (height + 7) // 8
    bands = [('flat', 9, rng.choice([WHITE, DARK])), ('flat', 16, rng.choice([WHITE, RED])),
             ('photo', photo_units, rng.choice(PHOTO_TINTS))]
    used = 25 + photo_units
    while units - used > 20:
        bands += [('text', 5, WHITE), ('flat', 3, WHITE)]
        used += 8
    bands.append(('flat', units - used, NAV))
    return bands


def png_chunk(kind, data):
    return struct.pack('>I', len(data)) + kind + data + struct.pack('>I', zlib.crc32(kind + data))


# Photo noise: 3 random bits a channel, so zlib keeps a photo near its real size.
NOISE = bytes((b & 7) * 8 for b in range(256))


def png_rows(rng, width, kind, units, colour):
    """Raw RGB pixel rows (without the filter byte) for one band."""
    rows = 8 * units
    if kind == 'flat':
        return [bytes(colour) * width] * rows
    if kind == 'photo':
        base = int.from_bytes(bytes(channel - 40 for channel in colour) * width, 'big')
        # Adding the noise as one big integer keeps it at C speed; no channel overflows.
        return [(int.from_bytes(rng.randbytes(width * 3).translate(NOISE), 'big') + base)
                .to_bytes(width * 3, 'big') for _ in range(rows)]
    words = text_line(rng, width)
    glyphs = b''.join(bytes(DARK if dark else WHITE) * length for dark, length in words)
    blank = bytes(WHITE) * width
    return [glyphs if 8 <= row < rows - 8 else blank for row in range(rows)]


def text_line(rng, width):
    """(dark?, pixels) segments: words and spaces of a line of text, with margins."""
    segments, x = [(False, 48)], 48
    while x < width - 96:
        word = min(rng.randint(24, 160), width - 48 - x)
        segments += [(True, word), (False, 16)]
        x += word + 16
    segments.append((False, width - x))
    return segments


def png_image(rng, width, height, photo_units):
    raw = b''.join(b'\x00' + row for band in screen_bands(rng, height, photo_units)
                   for row in png_rows(rng, width, *band))
    raw = raw[:(width * 3 + 1) * height]   # the last band may run past the screen's edge
    header = struct.pack('>IIBBBBB', width, height, 8, 2, 0, 0, 0)
    # Level 1: a phone compresses fast; the size stays realistic (hundreds of KB).
    return (b'\x89PNG\r\n\x1a\n' + png_chunk(b'IHDR', header)
            + png_chunk(b'IDAT', zlib.compress(raw, 1)) + png_chunk(b'IEND', b''))


# Baseline JPEG without a library. The quantised DCT coefficients are chosen
# directly (no DCT needed), one flat quantisation table keeps the DC arithmetic
# simple, and the Huffman tables give every symbol a fixed-length code (any
# complete prefix code is valid JPEG). Each MCU row is its own restart interval,
# so encoded rows are position-independent and can be cached and recombined:
# every image is unique while only one row is encoded afresh.
QUANT = 16
DC_SYMBOLS = list(range(12))
AC_SYMBOLS = [0x00, 0xF0] + [(run << 4) | size for run in range(16) for size in range(1, 11)]
AC_CODE = {symbol: index for index, symbol in enumerate(AC_SYMBOLS)}
EOB, ZRL = AC_CODE[0x00], AC_CODE[0xF0]


class BitWriter:
    def __init__(self):
        self.out = bytearray()
        self.acc = 0
        self.count = 0

    def put(self, value, length):
        self.acc = (self.acc << length) | value
        self.count += length
        while self.count >= 8:
            self.count -= 8
            self.out.append((self.acc >> self.count) & 0xFF)
        self.acc &= (1 << self.count) - 1

    def finish(self):
        """Pad with 1-bits and stuff a zero after every 0xFF, as entropy data requires."""
        if self.count:
            pad = 8 - self.count
            self.put((1 << pad) - 1, pad)
        return bytes(self.out).replace(b'\xff', b'\xff\x00')


def amplitude_bits(value, size):
    return value if value > 0 else value + (1 << size) - 1


def put_block(bits, dc_diff, acs):
    """One 8x8 block: the DC difference, then (zero run, value) AC pairs, then EOB."""
    size = abs(dc_diff).bit_length()
    bits.put(size, 4)
    if size:
        bits.put(amplitude_bits(dc_diff, size), size)
    position = 0
    for run, value in acs:
        while run > 15:
            bits.put(ZRL, 8)
            run, position = run - 16, position + 16
        size = abs(value).bit_length()
        bits.put(AC_CODE[(run << 4) | size], 8)
        bits.put(amplitude_bits(value, size), size)
        position += run + 1
    if position < 63:
        bits.put(EOB, 8)


def encode_interval(mcus):
    """Entropy-code one restart interval of (Y, Cb, Cr) blocks, each (dc, acs)."""
    bits, previous = BitWriter(), [0, 0, 0]
    for mcu in mcus:
        for component, (dc, acs) in enumerate(mcu):
            put_block(bits, dc - previous[component], acs)
            previous[component] = dc
    return bits.finish()


def dc_levels(rgb):
    """Quantised DC of Y, Cb, Cr for a colour (pixel = DC * QUANT / 8 + 128)."""
    r, g, b = rgb
    channels = (0.299 * r + 0.587 * g + 0.114 * b,
                128 - 0.168736 * r - 0.331264 * g + 0.5 * b,
                128 + 0.5 * r - 0.418688 * g - 0.081312 * b)
    return [max(-63, min(63, round((value - 128) * 8 / QUANT))) for value in channels]


def texture(rng, count, strength):
    """Random AC coefficients, stronger at low frequencies, as (zero run, value)."""
    acs, position = [], 0
    for _ in range(count):
        run = min(int(rng.expovariate(0.7)), 15)
        if position + run + 1 > 63:
            break
        position += run + 1
        value = int(strength / position ** 0.5 * rng.random()) + 1
        acs.append((run, value if rng.random() < 0.5 else -value))
    return acs


def photo_interval(rng, width_mcus, tint):
    y, cb, cr = dc_levels(tint)
    mcus = []
    for _ in range(width_mcus):
        y = max(-60, min(60, y + rng.randint(-3, 3)))
        mcus.append(((y, texture(rng, rng.randint(6, 14), 24)),
                     (cb + rng.randint(-2, 2), texture(rng, 2, 6)),
                     (cr + rng.randint(-2, 2), texture(rng, 2, 6))))
    return encode_interval(mcus)


def text_interval(rng, width_mcus):
    white, dark = dc_levels(WHITE), dc_levels(DARK)
    mcus = []
    for column in range(width_mcus):
        if 6 <= column < width_mcus - 6 and rng.random() < 0.7:
            mcus.append(((dark[0] + rng.randint(0, 20), texture(rng, 5, 30)), (dark[1], []), (dark[2], [])))
        else:
            mcus.append(((white[0], []), (white[1], []), (white[2], [])))
    return encode_interval(mcus)


class JpegRows:
    """Encoded MCU rows for one image width, shared by all phones (built once)."""
    _cache = {}
    _lock = threading.Lock()

    @classmethod
    def for_width(cls, width):
        with cls._lock:
            if width not in cls._cache:
                cls._cache[width] = cls(width)
            return cls._cache[width]

    def __init__(self, width):
        rng = random.Random(width)
        self.width_mcus = (width + 7) // 8
        self.photo = {tint: [photo_interval(rng, self.width_mcus, tint) for _ in range(2)]
                      for tint in PHOTO_TINTS}
        self.text = [text_interval(rng, self.width_mcus) for _ in range(4)]
        self.flat = {}

    def flat_row(self, colour):
        if colour not in self.flat:
            levels = dc_levels(colour)
            self.flat[colour] = encode_interval([tuple((dc, []) for dc in levels)] * self.width_mcus)
        return self.flat[colour]

    def band(self, rng, kind, units, colour):
        if kind == 'flat':
            return [self.flat_row(colour)] * units
        if kind == 'text':
            return [self.flat_row(WHITE)] + [rng.choice(self.text) for _ in range(units - 2)] + \
                [self.flat_row(WHITE)]
        pool = self.photo[colour]
        rows = [rng.choice(pool) for _ in range(units)]
        rows[rng.randrange(units)] = photo_interval(rng, self.width_mcus, colour)  # makes it unique
        return rows


def jpeg_segment(marker, payload):
    return bytes([0xFF, marker]) + struct.pack('>H', len(payload) + 2) + payload


def jpeg_image(rng, width, height, photo_units):
    rows = JpegRows.for_width(width)
    intervals = [row for band in screen_bands(rng, height, photo_units) for row in rows.band(rng, *band)]
    huffman = (b'\x00' + bytes([0, 0, 0, len(DC_SYMBOLS)] + [0] * 12) + bytes(DC_SYMBOLS)
               + b'\x10' + bytes([0] * 7 + [len(AC_SYMBOLS)] + [0] * 8) + bytes(AC_SYMBOLS))
    header = (b'\xff\xd8'
              + jpeg_segment(0xE0, b'JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00')
              + jpeg_segment(0xDB, b'\x00' + bytes([QUANT] * 64))
              + jpeg_segment(0xC0, struct.pack('>BHHB', 8, height, width, 3)
                             + b'\x01\x11\x00\x02\x11\x00\x03\x11\x00')
              + jpeg_segment(0xC4, huffman)
              + jpeg_segment(0xDD, struct.pack('>H', rows.width_mcus))
              + jpeg_segment(0xDA, b'\x03\x01\x00\x02\x00\x03\x00\x00\x3f\x00'))
    body = bytearray(intervals[0])
    for index, interval in enumerate(intervals[1:]):
        body += bytes([0xFF, 0xD0 + index % 8]) + interval  # RST0..RST7 between intervals
    return header + bytes(body) + b'\xff\xd9'


def screenshot(rng, fmt, width, height, kind):
    """(bytes, mime) of a screenshot: a note page shows a bigger photo than a DM chat."""
    photo_units = rng.randint(28, 45) if kind == 'note' else rng.randint(18, 30)
    if fmt == 'jpeg':
        return jpeg_image(rng, width, height, photo_units), 'image/jpeg'
    return png_image(rng, width, height, photo_units), 'image/png'


def stamped(data, fmt, text):
    """The image with a comment (PNG tEXt chunk after IHDR, JPEG COM segment after SOI):
    still valid, and unique bytes for the server without drawing it again."""
    note = text.encode('latin-1')   # tEXt is Latin-1
    if fmt == 'jpeg':
        return data[:2] + jpeg_segment(0xFE, note) + data[2:]
    return data[:33] + png_chunk(b'tEXt', b'Comment\x00' + note) + data[33:]


def encode_base64(data, variant, mime):
    """Base64 the way a phone script sends it (API.md §3)."""
    if variant == 'wrapped':
        return base64.encodebytes(data).decode('ascii')            # '\n' every 76 characters
    if variant == 'data-uri':
        return 'data:%s;base64,%s' % (mime, base64.b64encode(data).decode('ascii'))
    if variant == 'urlsafe':
        return base64.urlsafe_b64encode(data).decode('ascii').rstrip('=')
    return base64.b64encode(data).decode('ascii')


# --------------------------------------------------------------------------
# Request bodies, as OkHttp, Auto.js and python-requests put them on the wire
# --------------------------------------------------------------------------

# OkHttp 3 FormBody's FORM_ENCODE_SET, plus '%', '+' and control characters.
FORM_ESCAPES = {c: '%%%02X' % c for c in range(128)
                if c < 0x20 or c == 0x7F or chr(c) in ' "\':;<=>@[]^`{}|/\\?#&!$(),~%+'}


def okhttp_quote(value):
    """OkHttp 3 FormBody encoding: UTF-8 percent-encoding, %20 for space, %2B for '+'.

    str.translate keeps megabytes of base64 fast; only Chinese text goes char by char.
    """
    if value.isascii():
        return value.translate(FORM_ESCAPES)
    return ''.join(ch.translate(FORM_ESCAPES) if ch.isascii() else urllib.parse.quote(ch) for ch in value)


def pairs(params):
    """(name, text) pairs; a list becomes a repeated field."""
    for name, value in params.items():
        for item in (value if isinstance(value, list) else [value]):
            yield name, str(item)


def form_body(params, raw=()):
    """An urlencoded body; names in `raw` are pasted unescaped (string-building scripts)."""
    return '&'.join('%s=%s' % (okhttp_quote(name), text if name in raw else okhttp_quote(text))
                    for name, text in pairs(params)).encode('utf-8')


def multipart_body(params, boundary):
    """python-requests (urllib3) multipart with text parts."""
    parts = [b'--%s\r\nContent-Disposition: form-data; name="%s"\r\n\r\n%s\r\n'
             % (boundary.encode(), name.encode('utf-8'), text.encode('utf-8'))
             for name, text in pairs(params)]
    return b''.join(parts) + b'--%s--\r\n' % boundary.encode()


def encode_post(params, encoding, rng):
    """(body, Content-Type or None) for one POST in the given encoding."""
    if encoding == 'form':
        return form_body(params), 'application/x-www-form-urlencoded'
    if encoding == 'form-raw':
        return form_body(params, raw={'img_base64_data'}), 'application/x-www-form-urlencoded'
    if encoding == 'multipart':
        boundary = '%032x' % rng.getrandbits(128)
        return multipart_body(params, boundary), 'multipart/form-data; boundary=' + boundary
    text = json.dumps(params, ensure_ascii=False)
    if encoding == 'json-text':
        return text.encode('utf-8'), 'text/plain'
    if encoding == 'json-string':
        return json.dumps(text, ensure_ascii=False).encode('utf-8'), None   # JSON holding JSON
    return text.encode('utf-8'), 'application/json; charset=utf-8'        # http.postJson


# --------------------------------------------------------------------------
# Phone script styles
# --------------------------------------------------------------------------

OKHTTP = {'Connection': 'Keep-Alive', 'Accept-Encoding': 'gzip'}
REQUESTS = {'Accept-Encoding': 'gzip, deflate', 'Accept': '*/*', 'Connection': 'keep-alive'}

# Phone i runs STYLES[i % len(STYLES)], so a run of five phones covers every variant.
STYLES = [
    {'name': 'autojs-form', 'agent': 'okhttp/3.12.1', 'headers': OKHTTP, 'posts': ('form', 'form', 'json'),
     'prefix': '/api_hurong', 'suffix': '/0', 'paths': 'legacy', 'b64': ('plain',), 'images': ('png',),
     'mac': 'upper-newline', 'query': {'t': 'phone'}, 'extra': {}, 'since': False, 'sim_on_upload': True},
    {'name': 'autojs-json', 'agent': 'okhttp/3.12.13', 'headers': OKHTTP, 'posts': ('json', 'json', 'form'),
     'prefix': '', 'suffix': '', 'paths': 'contract', 'b64': ('data-uri', 'plain'), 'images': ('png', 'jpeg'),
     'mac': 'lower', 'query': {}, 'extra': {}, 'since': True, 'sim_on_upload': False},
    {'name': 'python', 'agent': 'python-requests/2.31.0', 'headers': REQUESTS, 'posts': ('multipart',),
     'prefix': '', 'suffix': '/0/', 'paths': 'contract', 'b64': ('wrapped', 'plain'), 'images': ('jpeg', 'png'),
     'mac': 'dash', 'query': {}, 'extra': {}, 'since': True, 'sim_on_upload': True},
    {'name': 'autojs-old', 'agent': 'okhttp/3.10.0', 'headers': OKHTTP, 'posts': ('form-raw', 'form'),
     'prefix': '/api_hurong', 'suffix': '/0', 'paths': 'document', 'b64': ('plain',), 'images': ('png',),
     'mac': 'bare', 'query': {'t': 'phone'}, 'extra': {'xhs_version': '8.32.0'}, 'since': False, 'sim_on_upload': False},
    {'name': 'autojs-plain', 'agent': 'okhttp/3.14.9', 'headers': OKHTTP, 'posts': ('json-text', 'json-string'),
     'prefix': '', 'suffix': '/', 'paths': 'contract', 'b64': ('urlsafe', 'plain'), 'images': ('jpeg', 'png'),
     'mac': 'placeholder', 'query': {}, 'extra': {}, 'since': False, 'sim_on_upload': True},
]
SCREENS = [(1080, 2340), (1080, 2400), (720, 1600)]


def endpoint_path(endpoint, dialect):
    """(path, extra parameters) a script of this dialect uses for a canonical endpoint."""
    group, action = endpoint.split('/')
    if group != 'DMS_screenshots' or dialect == 'contract':
        return endpoint, {}
    if dialect == 'legacy':
        return 'comment_management/' + LEGACY_NAMES.get(action, action), {}
    if action in DOCUMENT_PATHS:
        path, extra = DOCUMENT_PATHS[action]
        return 'DMS_screenshots/' + path, dict(extra)
    return endpoint, {}


def mac_text(mac, style):
    """The MAC as this script reads it (API.md: uppercase, newline, placeholder...)."""
    if style == 'upper-newline':
        return mac.upper() + '\n'
    if style == 'dash':
        return mac.replace(':', '-')
    if style == 'bare':
        return mac.replace(':', '')
    if style == 'placeholder':
        return '02:00:00:00:00:00'   # Android 10+ hides the real MAC
    return mac


# --------------------------------------------------------------------------
# Recording what happened, and judging answers against the contract
# --------------------------------------------------------------------------

def group_of(endpoint):
    return endpoint.split('/')[0]


class Recorder:
    """Counts, errors and violations of all phones; every method is thread-safe."""

    def __init__(self):
        self.lock = threading.Lock()
        self.requests = collections.Counter()
        self.codes = collections.defaultdict(collections.Counter)
        self.counters = collections.Counter()
        self.tasks_done = collections.Counter()
        self.images = collections.Counter()
        self.problems = {'violation': collections.Counter(), 'error': collections.Counter()}
        self.examples = {'violation': collections.defaultdict(list), 'error': collections.defaultdict(list)}
        self.holder = {}       # (kind, id) -> SIM it was handed to
        self.completed = set()  # (kind, id) whose completion was answered 200
        self.numbers = {}      # phone number -> SIM it is bound to
        self.answered = 0      # answers received at all (0: the server was never reached)

    def count(self, name, amount=1):
        with self.lock:
            self.counters[name] += amount

    def problem(self, level, kind, endpoint, phone, detail):
        with self.lock:
            self.problems[level][kind] += 1
            examples = self.examples[level][(kind, endpoint)]
            if len(examples) < EXAMPLES_PER_KIND:
                examples.append({'kind': kind, 'endpoint': endpoint, 'phone': phone, 'detail': detail})

    def violation(self, kind, endpoint, phone, detail):
        self.problem('violation', kind, endpoint, phone, detail)

    def error(self, kind, endpoint, phone, detail):
        self.problem('error', kind, endpoint, phone, detail)

    def request(self, endpoint):
        with self.lock:
            self.requests[endpoint] += 1

    def code(self, endpoint, code):
        with self.lock:
            self.codes[endpoint][str(code)] += 1
            self.answered += 1

    def image(self, fmt, size):
        with self.lock:
            self.images[fmt] += 1
            self.images['bytes'] += size

    def handed_out(self, kind, task_id, phone, endpoint):
        """A task poll returned this task to this phone: check who else had it."""
        key = (kind, task_id)
        with self.lock:
            holder = self.holder.setdefault(key, phone)
            lost = key in self.completed
        if holder != phone:
            self.violation('double_handout', endpoint, phone,
                           '%s task %s handed to %s, already handed to %s' % (kind, task_id, phone, holder))
        elif lost:
            self.violation('lost_completion', endpoint, phone,
                           '%s task %s handed out again after its completion was answered 200'
                           % (kind, task_id))

    def done(self, kind, task_id):
        with self.lock:
            if (kind, task_id) not in self.completed:
                self.completed.add((kind, task_id))
                self.tasks_done[kind] += 1

    def bound(self, number, phone, endpoint):
        with self.lock:
            holder = self.numbers.setdefault(number, phone)
        if holder != phone:
            self.violation('number_two_sims', endpoint, phone,
                           'number %s bound to %s and to %s' % (number, holder, phone))

    def judge(self, endpoint, phone, status, ctype, raw):
        """The envelope of an HTTP answer, or None; records what the contract forbids."""
        if status != 200:
            self.violation('http_status', endpoint, phone, 'HTTP %d: %r' % (status, raw[:120]))
            with self.lock:
                self.codes[endpoint]['http %d' % status] += 1
                self.answered += 1
            return None
        try:
            body = json.loads(raw.decode('utf-8'))
        except ValueError:
            self.code(endpoint, 'non-json')
            self.violation('not_json', endpoint, phone, '%s: %r' % (ctype, raw[:120]))
            return None
        if not is_envelope(body):
            self.code(endpoint, 'no-envelope')
            self.violation('bad_envelope', endpoint, phone, repr(raw[:160]))
            return None
        if not (ctype or '').lower().startswith('application/json'):
            self.violation('content_type', endpoint, phone, 'Content-Type %r' % ctype)
        self.code(endpoint, body['code'])
        self.judge_code(endpoint, phone, body)
        return body

    def judge_code(self, endpoint, phone, body):
        code, detail = body['code'], '%s %s' % (body['code'], body['msg'])
        if code in NORMAL_CODES.get(endpoint, {200}):
            return
        if code == 500:
            self.violation('internal_error', endpoint, phone, detail)
        elif code == 402:
            self.violation('unknown_action', endpoint, phone, detail)
        elif code in SETUP_CODES:
            self.error(SETUP_CODES[code], endpoint, phone, detail)
        elif code == 301 and endpoint in COMPLETIONS:
            self.error('completion_refused', endpoint, phone, detail)
        else:
            self.violation('refused', endpoint, phone, detail)


def is_envelope(body):
    return (isinstance(body, dict) and {'code', 'msg', 'data', 'note'} <= set(body)
            and isinstance(body['code'], int) and not isinstance(body['code'], bool)
            and isinstance(body['msg'], str) and isinstance(body['data'], dict)
            and isinstance(body['note'], dict))


def ok(answer):
    return answer is not None and answer['code'] == 200


# --------------------------------------------------------------------------
# Time
# --------------------------------------------------------------------------

class Clock:
    """The run's deadline, and the scale that compresses SIM_DAY into it."""

    def __init__(self, seconds):
        self.seconds = seconds
        self.end = time.monotonic() + seconds
        self.scale = seconds / SIM_DAY
        self.stopped = threading.Event()

    def remaining(self):
        return max(0.0, self.end - time.monotonic())

    def over(self):
        return self.remaining() <= 0

    def sleep(self, sim_seconds, floor=0.02):
        """Sleep a simulated duration, scaled, at least `floor`, never past the end."""
        time.sleep(min(max(sim_seconds * self.scale, floor), self.remaining()))

    def rest(self, minutes):
        """A phone's rest between rounds: scaled, and at most a tenth of the run."""
        time.sleep(min(minutes * 60 * self.scale, self.seconds / 10, self.remaining()))


# --------------------------------------------------------------------------
# The wire: one keep-alive connection, resending like OkHttp
# --------------------------------------------------------------------------

STALE = (http.client.RemoteDisconnected, http.client.BadStatusLine, http.client.CannotSendRequest,
         http.client.ResponseNotReady, ConnectionResetError, BrokenPipeError, ConnectionAbortedError)


class Wire:
    """One phone thread's HTTP connection to the server."""

    def __init__(self, base):
        self.base = base
        self.conn = None

    def connect(self):
        cls = http.client.HTTPSConnection if self.base.scheme == 'https' else http.client.HTTPConnection
        self.conn = cls(self.base.hostname, self.base.port, timeout=REQUEST_TIMEOUT)

    def close(self):
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    def exchange(self, method, target, body, headers):
        """(status, Content-Type, body bytes). A stale keep-alive connection is
        reopened and the request sent again once, silently, as OkHttp does."""
        for attempt in (1, 2):
            if self.conn is None:
                self.connect()
            try:
                self.conn.request(method, target, body=body, headers=headers)
                res = self.conn.getresponse()
                data = res.read()
            except STALE:
                self.close()
                if attempt == 2:
                    raise
                continue
            except Exception:
                self.close()
                raise
            if res.getheader('Content-Encoding', '').lower() == 'gzip':
                data = gzip.decompress(data)   # OkHttp asked for gzip, so it unpacks it
            if res.will_close:
                self.close()
            return res.status, res.getheader('Content-Type', ''), data


# --------------------------------------------------------------------------
# A virtual phone
# --------------------------------------------------------------------------

def sim_identity(seed, index):
    """(imsi, iccid, mac, own number) of phone `index`: deterministic from the seed,
    distinct within a run (the index is part of each)."""
    rng = random.Random('sim/%s/%d' % (seed, index))
    mnc = rng.choice(['00', '01', '02', '11'])
    imsi = '460%s%05d%05d' % (mnc, rng.randrange(10 ** 5), index)
    iccid = '8986%s%09d%05d' % (mnc, rng.randrange(10 ** 9), index)
    first = (rng.randrange(256) & 0xFC) | 0x02   # locally administered, as Android's random MACs
    mac = ':'.join('%02x' % b for b in [first, rng.randrange(256), rng.randrange(256),
                                        rng.randrange(256), index >> 8 & 0xFF, index & 0xFF])
    own = '19%01d%08d' % (rng.randrange(10), rng.randrange(10 ** 8))
    return imsi, iccid, mac, own


def note_url(rng):
    """A share link of a published note: 24 hex digits, with the app's tracking query."""
    note = '%08x%016x' % (int(time.time()), rng.getrandbits(64))
    token = base64.b64encode(rng.randbytes(12)).decode()
    return 'https://www.xiaohongshu.com/explore/%s?xsec_token=%s&xsec_source=app_share' % (
        note, urllib.parse.quote(token, safe=''))


class Phone:
    """One phone running its script's day: register, publish, DMs, comments, rest."""

    def __init__(self, index, seed, base, clock, recorder, operator=None):
        self.index, self.base, self.clock, self.recorder, self.operator = index, base, clock, recorder, operator
        self.rng = random.Random('phone/%s/%d' % (seed, index))
        self.style = STYLES[index % len(STYLES)]
        self.imsi, self.iccid, self.mac, self.own_number = sim_identity(seed, index)
        self.sim = {'imsi': self.imsi, 'iccid': self.iccid}
        self.name = 'phone%d(%s)' % (index + 1, self.imsi)
        self.screen = SCREENS[index % len(SCREENS)]
        self.wire, self.watch_wire = Wire(base), Wire(base)
        self.started = threading.Event()
        self.number = None
        self.rounds = 0
        self.shots = {}    # (format, kind) -> a few screenshots drawn so far
        self.uploads = 0

    # -- talking to the server ---------------------------------------------

    def target(self, path, query):
        prefix = '' if self.base.path.endswith('/api_hurong') else self.style['prefix']
        target = self.base.path + prefix + '/' + path + self.style['suffix']
        return target + ('?' + urllib.parse.urlencode(query) if query else '')

    def call(self, endpoint, params, poll=False, wire=None):
        """Send one phone request; the envelope, or None when there is no usable answer.

        Polls are GETs with a query string; everything else is a POST in one of the
        style's encodings. Resent up to RESENDS times on a timeout or non-2xx status.
        """
        path, extra = endpoint_path(endpoint, self.style['paths'])
        params = {**self.style['extra'], **params, **extra}
        headers = dict(self.style['headers'], **{'Host': self.base.netloc, 'User-Agent': self.style['agent']})
        if poll:
            method, body = 'GET', None
            target = self.target(path, {**self.style['query'], **params})
        else:
            method = 'POST'
            body, ctype = encode_post(params, self.rng.choice(self.style['posts']), self.rng)
            if ctype:
                headers['Content-Type'] = ctype
            target = self.target(path, self.style['query'])
        return self.send(endpoint, method, target, body, headers, wire or self.wire)

    def send(self, endpoint, method, target, body, headers, wire):
        self.recorder.request(endpoint)
        for attempt in range(1 + RESENDS):
            if attempt:
                self.recorder.count('resent')
            try:
                status, ctype, raw = wire.exchange(method, target, body, headers)
            except socket.timeout:
                self.recorder.error('timeout', endpoint, self.name, 'no answer in %d s' % REQUEST_TIMEOUT)
                continue
            except (OSError, http.client.HTTPException) as error:
                self.recorder.error('connection', endpoint, self.name, str(error) or type(error).__name__)
                time.sleep(0.2)
                continue
            if 200 <= status < 300 or attempt == RESENDS:
                return self.recorder.judge(endpoint, self.name, status, ctype, raw)
            self.recorder.judge(endpoint, self.name, status, ctype, raw)   # non-2xx: resend
        return None

    def log(self, message):
        params = {'log_msg': message, 'macaddr': mac_text(self.mac, self.style['mac']),
                  'ip_addr': '192.168.1.%d' % (100 + self.index % 150), 'phone_type': 2, **self.sim}
        return self.call('xhs_phone_log/add', params)

    def bad_data(self, endpoint, detail):
        self.recorder.violation('bad_data', endpoint, self.name, detail)

    # -- the day -------------------------------------------------------------

    def run(self):
        try:
            time.sleep(self.rng.uniform(0, min(0.5, self.clock.seconds / 20)))  # phones start apart
            if ok(self.log('脚本启动 %s，开始检查账号' % SCRIPT_VERSION)) and self.operator:
                self.operator.phone_ready(self)
            self.started.set()
            self.register_if_needed()
            while not self.clock.over():
                self.one_round()
        except Exception as error:  # a simulator bug must not hang the run: report it
            self.recorder.error('simulator', '-', self.name, '%s: %s' % (type(error).__name__, error))
        finally:
            self.started.set()
            self.wire.close()

    def one_round(self):
        steps = [self.publish, self.direct_messages, self.comment_replies, self.comment_deletes,
                 self.reading_counts, self.rest]
        for step in steps:
            if self.clock.over():
                return
            step()
        self.rounds += 1

    # -- registering the account --------------------------------------------

    def register_if_needed(self):
        answer = self.call('xiaohongshu_userprofile/is_update_userinfo', self.sim, poll=True)
        if not ok(answer) or not answer['data'].get('is_update'):
            return
        self.log('账号需要注册，获取新账号资料')
        name = self.take_profile()
        number = self.phone_number()
        self.log('获取手机号：%s' % number)
        code = self.wait_for_code(number)
        if code is None:
            self.log('未收到验证码，稍后重试')
            return
        self.log('收到验证码，登录成功')
        params = {'phone_num': number, **self.sim, 'name': name,
                  'xiaohongshu_id': str(9550000000 + self.rng.randrange(10 ** 8)),
                  'home_url': 'https://www.xiaohongshu.com/user/profile/%024x' % self.rng.getrandbits(96),
                  'macaddr': mac_text(self.mac, self.style['mac']), 'platform': 1}
        if ok(self.call('xiaohongshu_userprofile/update_userinfo', params)):
            self.recorder.count('accounts_registered')
            self.log('账号信息已上报：%s' % name)

    def take_profile(self):
        endpoint = 'xhs_phone_management/get_xhs_unregistered_information'
        answer = self.call(endpoint, {'get_info_number': 1, **self.sim}, poll=True)
        profiles = answer['data'].get('ret_data') if ok(answer) else None
        if profiles and isinstance(profiles[0], dict) and profiles[0].get('name'):
            self.recorder.count('profiles_taken')
            return profiles[0]['name']
        if ok(answer):
            self.bad_data(endpoint, 'code 200 without data.ret_data[0].name: %r' % answer['data'])
        self.log('暂无未注册账号资料，使用本机账号昵称')
        return '%s%02d' % (self.rng.choice(PROFILE_NAMES), self.index)

    def phone_number(self):
        """The pool number bound to this SIM; the SIM's own number when the pool is empty."""
        endpoint = 'xhs_phone_management/get_phone_number'
        answer = self.call(endpoint, self.sim, poll=True)
        number = answer['data'].get('phone_number') if ok(answer) else None
        if not isinstance(number, str) and ok(answer):
            self.bad_data(endpoint, 'data.phone_number is not a string: %r' % (number,))
        if not number or not isinstance(number, str):
            return self.own_number
        if self.number not in (None, number):
            self.recorder.violation('number_changed', endpoint, self.name,
                                    'bound number changed from %s to %s' % (self.number, number))
        self.number = number
        self.recorder.bound(number, self.name, endpoint)
        return number

    def wait_for_code(self, number):
        """Poll get_verification_code until 200; after the first 301 the SIM's
        SMS-forwarder app posts the code SMS (nobody types codes in a simulation)."""
        params = {'phone_number': number if self.index % 2 else '+86 ' + number}
        if self.style['since']:
            params['since'] = int(time.time()) - 60   # a minute of slack for clock skew
        sent = None
        for _ in range(60):
            answer = self.call('xhs_phone_management/get_verification_code', params, poll=True)
            if ok(answer):
                code = answer['data'].get('verification_code')
                if sent and code != sent:
                    self.recorder.error('wrong_code', 'xhs_phone_management/get_verification_code',
                                        self.name, 'sent %s, got %r' % (sent, code))
                self.recorder.count('codes_received')
                return code
            if self.clock.over():
                return None
            if sent is None:
                sent = self.forward_sms(number)
            self.clock.sleep(5, floor=0.05)
        return None

    def forward_sms(self, number):
        """The SIM's SMS-forwarder app posts the received SMS, pointed at its own number."""
        code = '%06d' % self.rng.randrange(10 ** 6)
        text = SMS_TEXT.format(code=code)
        root = self.base.path.removesuffix('/api_hurong')
        target = '%s/sms/receive?%s' % (root, urllib.parse.urlencode({'phone_number': number}))
        headers = dict(OKHTTP, **{'Host': self.base.netloc, 'User-Agent': 'okhttp/3.12.1'})
        if self.index % 2:
            body = form_body({'from': SMS_SENDER, 'content': text, 'timestamp': int(time.time() * 1000)})
            headers['Content-Type'] = 'application/x-www-form-urlencoded'
        else:
            payload = {'event': 'sms:received', 'payload': {
                'message': text, 'phoneNumber': SMS_SENDER,
                'receivedAt': time.strftime('%Y-%m-%dT%H:%M:%S')}}
            body = json.dumps(payload, ensure_ascii=False).encode('utf-8')
            headers['Content-Type'] = 'application/json; charset=utf-8'
        answer = self.send('sms/receive', 'POST', target, body, headers, self.wire)
        if ok(answer):
            self.recorder.count('sms_forwarded')
        return code

    # -- tasks ---------------------------------------------------------------

    def poll_task(self, kind, endpoint):
        """The task a poll hands out, or None (`当前无任务` / `无任务` answer with {})."""
        answer = self.call(endpoint, self.sim, poll=True)
        if not ok(answer) or not answer['data']:
            return None
        task = answer['data']
        if not isinstance(task.get('id'), int) or isinstance(task.get('id'), bool):
            self.bad_data(endpoint, 'task without an integer id: %r' % task)
            return None
        self.recorder.handed_out(kind, task['id'], self.name, endpoint)
        return task

    def complete(self, kind, task_id, endpoint, params):
        """Report a task done; a 200 makes it a completion the server must keep."""
        answer = self.call(endpoint, params)
        if ok(answer):
            self.recorder.done(kind, task_id)
        return answer

    def publish(self):
        task = self.poll_task('release', 'xiaohongshu_biji/get_release_task')
        if task is None:
            return
        # A task in hand is finished even past the deadline, so no run leaves one stuck.
        self.log('开始发布笔记：%s' % (task.get('title') or str(task.get('content', ''))[:20]))
        self.fetch_images(task.get('images') or [])
        self.clock.sleep(90)   # typing and posting the note in the app
        url = note_url(self.rng)
        params = {'task_id': task['id'], 'url': url}
        if self.style['sim_on_upload']:
            params.update(self.sim)
        endpoint = 'xiaohongshu_biji/upload_url'
        if not ok(self.complete('release', task['id'], endpoint, params)):
            return
        if self.rng.random() < 0.25:   # OkHttp re-sends a POST on a stale connection
            again = self.call(endpoint, params)
            if again is not None and again['code'] == 301:   # must be 200, unchanged
                self.recorder.violation('duplicate_refused', endpoint, self.name,
                                        'the same report again: %s %s' % (again['code'], again['msg']))
        self.log('笔记发布成功：%s' % url.split('?')[0])
        if not self.clock.over():
            self.scan_comments(task['id'], url)

    def fetch_images(self, urls):
        """Download the note's images like the phone does before posting (our server's only)."""
        for url in urls if isinstance(urls, list) else []:
            parts = urllib.parse.urlsplit(str(url))
            if '/media/' not in parts.path or parts.netloc != self.base.netloc:
                continue
            self.recorder.request('media')
            try:
                status, _, data = self.wire.exchange('GET', parts.path, None, {'Host': self.base.netloc})
            except (OSError, http.client.HTTPException) as error:
                self.recorder.error('connection', 'media', self.name, str(error))
                continue
            self.recorder.code('media', status)
            # An error, not a violation: a server started with another --data-dir than
            # the operator CLI used stores the task's image where it cannot serve it.
            if status != 200 or data[:3] not in (b'\x89PN', b'\xff\xd8\xff', b'GIF', b'RIF'):
                self.recorder.error('media', 'media', self.name,
                                    'task image %s: HTTP %d, %d bytes' % (url, status, len(data)))

    # -- screenshots -----------------------------------------------------------

    def image_value(self, kind):
        """A screenshot in base64. Drawing one costs CPU the server also needs, so a
        phone keeps a few and draws a new one now and then; a stamp makes each unique."""
        fmt = self.rng.choice(self.style['images'])
        pool = self.shots.setdefault((fmt, kind), [])
        if not pool or self.rng.random() < 0.15:
            pool.append(screenshot(self.rng, fmt, *self.screen, kind))
            del pool[:-3]
        data, mime = self.rng.choice(pool)
        self.uploads += 1
        data = stamped(data, fmt, 'screenshot %s #%d %.3f' % (self.imsi, self.uploads, time.time()))
        self.recorder.image(fmt, len(data))
        return encode_base64(data, self.rng.choice(self.style['b64']), mime)

    def upload(self, endpoint, params, count):
        """Upload `count` screenshots; the URLs the server answered, or None."""
        images = [self.image_value('note' if count > 1 else 'dm') for _ in range(count)]
        params = dict(params, img_base64_data=images if count > 1 else images[0])
        answer = self.call(endpoint, params)
        if not ok(answer):
            return None
        keys = answer['data'].get('keys') if count > 1 else [answer['data'].get('key')]
        if not isinstance(keys, list) or len(keys) != count or not all(isinstance(k, str) and k for k in keys):
            self.bad_data(endpoint, 'expected %d image URL(s), got %r' % (count, answer['data']))
            return None
        return keys

    # -- direct messages ---------------------------------------------------------

    def direct_messages(self):
        if self.rng.random() < 0.6:
            name = self.rng.choice(DM_NAMES)
            if self.upload('xiaohongshu_direct_essages/save_screenshots', {**self.sim, 'name': name}, 1):
                self.log('私信截图已上传：%s' % name)
        task = self.poll_task('dm_reply', 'xiaohongshu_direct_essages/get_reply')
        if task is None:
            return
        self.clock.sleep(30)   # opening the chat and typing the reply
        if ok(self.complete('dm_reply', task['id'], 'xiaohongshu_direct_essages/reply_save',
                            {'task_id': task['id']})):
            self.log('私信回复完成：%s' % task.get('name'))

    # -- comments -------------------------------------------------------------

    def scan_comments(self, note_id, url):
        """Screenshot the new note and its comments, link it, report what is seen."""
        shots = self.upload('DMS_screenshots/save_screenshots', self.sim, 2)
        if not shots:
            return
        article, close_up = shots
        notes_url = url if self.rng.random() < 0.5 else url.split('?')[0]
        if ok(self.call('DMS_screenshots/associate_notes', {'notes_url': notes_url, 'screenshots': article})):
            self.check_link(article, note_id)
        for _ in range(self.rng.randint(1, 2)):
            self.report_comment(note_id, article, close_up)
        self.log('已查询完评论信息 🙂')

    def check_link(self, article, note_id):
        endpoint = 'DMS_screenshots/determine_correlation'
        answer = self.call(endpoint, {'screenshots': article})
        if ok(answer) and (answer['data'].get('flag') is not True or answer['data'].get('biji_id') != note_id):
            self.bad_data(endpoint, 'screenshot linked to note %s, answer %r' % (note_id, answer['data']))

    def report_comment(self, note_id, article, close_up):
        endpoint = 'DMS_screenshots/add_comment'
        params = {**self.sim, 'head_portrait': 'https://sns-avatar.example.invalid/%d.jpg' % self.rng.randrange(100),
                  'nick_name': self.rng.choice(COMMENTERS), 'comments_status': 1,
                  'comments_content': self.rng.choice(COMMENT_TEXTS),
                  'article_picture_address': article, 'screenshots_address': close_up}
        if self.rng.random() < 0.5:
            params['article_notes_id'] = note_id
        answer = self.call(endpoint, params)
        if not ok(answer):
            return
        comment_id = answer['data'].get('id')
        self.recorder.count('comments_reported')
        # A comment already known (an earlier run's, maybe deleted) is not moderated again.
        if self.operator and isinstance(comment_id, int) and answer['msg'] != '重复评论':
            self.operator.comment_reported(comment_id)
        if self.rng.random() < 0.2:   # seen again on the next scan: must not be duplicated
            again = self.call(endpoint, params)
            if ok(again) and again['data'].get('id') != comment_id:
                self.bad_data(endpoint, 'the same comment again got id %r, first %r'
                              % (again['data'].get('id'), comment_id))

    def comment_replies(self):
        task = self.poll_task('comment_reply', 'DMS_screenshots/query_reply_task')
        if task is None:
            return
        self.clock.sleep(30)
        params = {'comment_id': task['id']}
        when = self.rng.choice(['none', 'text', 'millis'])
        if when == 'text':
            params['comment_completion_time'] = time.strftime('%Y-%m-%d %H:%M:%S')
        elif when == 'millis':
            params['comment_completion_time'] = int(time.time() * 1000)
        if ok(self.complete('comment_reply', task['id'], 'DMS_screenshots/reply_comment_is_success', params)):
            self.log('评论回复完成：%s' % task.get('nick_name'))

    def comment_deletes(self):
        task = self.poll_task('comment_delete', 'DMS_screenshots/query_delete_task')
        if task is None:
            return
        self.clock.sleep(30)
        params = {'comment_id': task['id']}
        if self.rng.random() < 0.15:   # the comment could not be found on the phone
            if ok(self.call('DMS_screenshots/comment_post_exception_instead', params)):
                self.recorder.count('deletes_failed_reported')
                self.log('评论删除失败，已上报：%s' % task.get('user_name'))
            return
        # Only a deletion is final: a failed one may be ordered again by the operator.
        if ok(self.complete('comment_delete', task['id'], 'DMS_screenshots/reply_comment_is_delete', params)):
            self.log('评论已删除：%s' % task.get('user_name'))

    # -- housekeeping -----------------------------------------------------------

    def reading_counts(self):
        if self.rounds % 4:
            return
        answer = self.call('xiaohongshu_userprofile/check_updated_today', self.sim, poll=True)
        if ok(answer) and answer['data'].get('flag'):
            self.clock.sleep(60)
            if ok(self.call('xiaohongshu_userprofile/update_reading_update_time', self.sim)):
                self.log('阅读量已刷新')
        if self.rounds == 4:
            self.phone_number()   # mid-day the script asks its number again: it must not move

    def rest(self):
        endpoint = 'xiaohongshu_direct_essages/get_screenshot_time'
        answer = self.call(endpoint, self.sim, poll=True)
        minutes = answer['data'].get('screenshot_time') if ok(answer) else 20
        if not isinstance(minutes, int) or isinstance(minutes, bool):
            if ok(answer):
                self.bad_data(endpoint, 'data.screenshot_time is not an integer: %r' % (minutes,))
            minutes = 20
        self.log('休息 %d 分钟' % minutes)
        self.clock.rest(minutes)

    def watchdog(self):
        """The phone's watchdog script: asks whether the main script is alive."""
        self.started.wait(self.clock.seconds)
        interval = max(0.5, self.clock.seconds / 15)
        params = {'phone_type': 2, **self.sim, 'macaddr': mac_text(self.mac, self.style['mac'])}
        try:
            while not self.clock.stopped.wait(min(interval, self.clock.remaining())) and not self.clock.over():
                answer = self.call('xhs_phone_management/get_phone_work_status', params, poll=True,
                                   wire=self.watch_wire)
                self.recorder.count('watchdog_checks')
                if ok(answer) and answer['data'].get('flag'):
                    self.recorder.count('watchdog_abnormal')
        finally:
            self.watch_wire.close()


# --------------------------------------------------------------------------
# The operator (--seed-work): queues work with the CLI against the database
# --------------------------------------------------------------------------

def cli_command():
    script = os.path.join(os.path.dirname(sys.executable), 'xhs-server')
    return [script] if os.path.exists(script) else [sys.executable, '-m', 'cli']


class Operator:
    """Runs `xhs-server --db PATH ...` the way a person at the server would."""

    def __init__(self, db, data_dir, seed, recorder):
        self.seed, self.recorder = seed, recorder
        self.options = ['--db', db] + (['--data-dir', data_dir] if data_dir else [])
        self.clock = None   # the run's clock, once the phones start
        self.rng = random.Random('operator/%s' % seed)
        self.lock = threading.Lock()
        # Comments get their own workers: they arrive mid-run and their reply and
        # delete tasks must reach the phones before the run ends.
        self.pools = {'dm': concurrent.futures.ThreadPoolExecutor(1),
                      'comments': concurrent.futures.ThreadPoolExecutor(3)}
        self.seen = set()
        self.tag = time.strftime('%m%d%H%M%S')   # makes this run's profiles and notes new

    def cli(self, *args):
        self.recorder.count('operator_commands')
        try:
            result = subprocess.run(cli_command() + self.options + [str(a) for a in args],
                                    capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired) as error:
            self.recorder.error('operator', 'cli', '-', '%s: %s' % (args[:2], error))
            return False
        if result.returncode != 0:
            lines = (result.stderr or result.stdout).strip().splitlines() or ['exit %d' % result.returncode]
            self.recorder.error('operator', 'cli', '-', '%s: %s' % (' '.join(map(str, args[:2])), lines[-1]))
        return result.returncode == 0

    def prepare(self, phones, seconds):
        """Before the phones start: numbers, new-account profiles, and notes to
        publish (a few per phone, more for longer runs, so publishing goes on)."""
        with tempfile.TemporaryDirectory() as folder:
            numbers = os.path.join(folder, 'numbers.txt')
            with open(numbers, 'w', encoding='utf-8') as out:
                out.write(''.join('%s\n' % number for number in self.numbers(phones + 2)))
            self.cli('numbers', 'import', numbers)
            self.cli('profiles', 'import', self.write_profiles(folder, phones + 2))
            self.cli('tasks', 'import', self.write_releases(folder, phones * max(3, int(seconds / 4))))

    def numbers(self, count):
        rng = random.Random('numbers/%s' % self.seed)
        return ['199%08d' % rng.randrange(10 ** 8) for _ in range(count)]

    def write_profiles(self, folder, count):
        path = os.path.join(folder, 'profiles.csv')
        with open(path, 'w', encoding='utf-8') as out:
            out.write('gender_id,gender,head_portrait,birthday,name,platform\n')
            for i in range(count):
                gender = self.rng.choice([1, 2])
                out.write('%d,%s,https://sns-avatar.example.invalid/p%d.jpg,%d-%02d-%02d,%s%s%02d,1\n' % (
                    gender, '男' if gender == 1 else '女', i, self.rng.randint(1990, 2003),
                    self.rng.randint(1, 12), self.rng.randint(1, 28), PROFILE_NAMES[i % len(PROFILE_NAMES)],
                    self.tag, i))
        return path

    def write_releases(self, folder, count):
        """JSON lines; half the notes carry an image the phones download from /media/."""
        image = os.path.join(folder, 'cover.png')
        with open(image, 'wb') as out:
            out.write(png_image(random.Random(self.seed), 720, 960, 24))
        path = os.path.join(folder, 'release.jsonl')
        with open(path, 'w', encoding='utf-8') as out:
            for i in range(count):
                title, content, topics = NOTES[i % len(NOTES)]
                item = {'title': title, 'content': '%s\n#模拟%s-%d' % (content, self.tag, i),
                        'topics': topics, 'platform': 1, 'images': [image] if i % 2 else []}
                out.write(json.dumps(item, ensure_ascii=False) + '\n')
        return path

    def submit(self, pool, *args):
        """Run a command in the background unless the run is (nearly) over."""
        if self.clock.remaining() > 0.5:
            self.pools[pool].submit(self.cli, *args)

    def phone_ready(self, phone):
        """A phone registered itself with its first request: queue a DM reply for it."""
        with self.lock:
            name, msg = self.rng.choice(DM_NAMES), self.rng.choice(DM_REPLIES)
        self.submit('dm', 'tasks', 'add-reply', '--phone', phone.imsi, '--name', name, '--msg', msg)

    def comment_reported(self, comment_id):
        """Moderate each new comment: answer most, order some deleted."""
        with self.lock:
            if comment_id in self.seen:
                return
            self.seen.add(comment_id)
            choice = self.rng.random()
            reply = self.rng.choice(COMMENT_REPLIES)
        if choice < 0.6:
            self.submit('comments', 'comments', 'reply', comment_id, reply)
        else:
            self.submit('comments', 'comments', 'delete', comment_id)

    def finish(self):
        for pool in self.pools.values():
            pool.shutdown(wait=True, cancel_futures=True)


# --------------------------------------------------------------------------
# Running, and the summary
# --------------------------------------------------------------------------

def reachable(url):
    """Whether a server answers GET /healthz at `url` (before the operator's work is seeded)."""
    base = urllib.parse.urlsplit(url.rstrip('/'))
    make = http.client.HTTPSConnection if base.scheme == 'https' else http.client.HTTPConnection
    try:
        conn = make(base.hostname, base.port, timeout=5)
        conn.request('GET', '/healthz')
        conn.getresponse().read()
        conn.close()
        return True
    except (OSError, ValueError, http.client.HTTPException):
        return False


def run_simulation(url, phones=5, seconds=30.0, seed=1, seed_work=False, db=None, data_dir=None):
    """Run the phones and return the summary (a dict, as printed by --json)."""
    base = urllib.parse.urlsplit(url.rstrip('/'))
    if base.scheme not in ('http', 'https') or not base.hostname:
        raise click.BadParameter('%r is not an http(s) URL' % url, param_hint='--url')
    recorder = Recorder()
    operator = Operator(db, data_dir, seed, recorder) if seed_work else None
    if operator:
        operator.prepare(phones, seconds)
    clock = Clock(seconds)
    if operator:
        operator.clock = clock
    fleet = [Phone(i, seed, base, clock, recorder, operator) for i in range(phones)]
    threads = [threading.Thread(target=target, daemon=True, name='%s-%d' % (target.__name__, phone.index))
               for phone in fleet for target in (phone.run, phone.watchdog)]
    for thread in threads:
        thread.start()
    # Phones finish the request in hand; a server that stops answering gets a
    # bounded grace, then the summary is made of what was seen.
    give_up = time.monotonic() + seconds + 2 * REQUEST_TIMEOUT
    for thread in threads:
        thread.join(max(0.0, give_up - time.monotonic()))
    clock.stopped.set()
    if operator:
        operator.finish()
    with recorder.lock:
        return summary(recorder, url, phones, seconds, seed, fleet)


def problems_of(recorder, level):
    counts = recorder.problems[level]
    examples = [item for items in recorder.examples[level].values() for item in items]
    return {'count': sum(counts.values()), 'by_kind': dict(sorted(counts.items())), 'examples': examples}


def summary(recorder, url, phones, seconds, seed, fleet):
    by_group = collections.Counter()
    for endpoint, count in recorder.requests.items():
        by_group[group_of(endpoint)] += count
    counters = recorder.counters
    result = {
        'url': url, 'phones': phones, 'seconds': seconds, 'seed': seed,
        'styles': sorted({phone.style['name'] for phone in fleet}),
        'requests': {'total': sum(recorder.requests.values()), 'resent': counters['resent'],
                     'by_group': dict(sorted(by_group.items())),
                     'by_endpoint': dict(sorted(recorder.requests.items()))},
        'codes': {endpoint: dict(sorted(codes.items())) for endpoint, codes in sorted(recorder.codes.items())},
        'tasks_done': {kind: recorder.tasks_done[kind] for kind in TASK_KINDS},
        'activity': {name: counters[name] for name in (
            'accounts_registered', 'profiles_taken', 'sms_forwarded', 'codes_received', 'comments_reported',
            'deletes_failed_reported', 'watchdog_checks', 'watchdog_abnormal', 'operator_commands')},
        'images': {'uploaded': recorder.images['png'] + recorder.images['jpeg'], 'png': recorder.images['png'],
                   'jpeg': recorder.images['jpeg'], 'bytes': recorder.images['bytes']},
        'errors': problems_of(recorder, 'error'),
        'violations': problems_of(recorder, 'violation'),
        'reached': recorder.answered > 0,
    }
    result['ok'] = result['reached'] and result['violations']['count'] == 0
    return result


def print_table(result):
    echo = click.echo
    echo('xhs-server simulate: %d phones for %gs against %s (seed %s; styles: %s)' % (
        result['phones'], result['seconds'], result['url'], result['seed'], ', '.join(result['styles'])))
    echo('')
    echo('%-56s %8s  %s' % ('ENDPOINT', 'REQUESTS', 'CODES (code×count)'))
    for endpoint, count in result['requests']['by_endpoint'].items():
        codes = result['codes'].get(endpoint, {})
        echo('%-56s %8d  %s' % (endpoint, count, '  '.join('%s×%d' % item for item in codes.items())))
    echo('%-56s %8d  (%d resent)' % ('total', result['requests']['total'], result['requests']['resent']))
    echo('')
    echo('tasks done   ' + ', '.join('%s %d' % item for item in result['tasks_done'].items()))
    echo('activity     ' + ', '.join('%s %d' % item for item in result['activity'].items() if item[1]))
    images = result['images']
    echo('images       %d uploaded (%d PNG, %d JPEG), %.1f MB' % (
        images['uploaded'], images['png'], images['jpeg'], images['bytes'] / 1e6))
    for level in ('errors', 'violations'):
        echo('%-12s %s' % (level, problem_line(result[level])))
        for item in result[level]['examples']:
            echo('    %s  %s  %s: %s' % (item['kind'], item['endpoint'], item['phone'], item['detail']))
    echo('')
    if not result['reached']:
        echo('RESULT       no answer from %s: is the server running?' % result['url'])
    elif result['ok']:
        echo('RESULT       OK: the server kept the phone contract')
    else:
        echo('RESULT       FAILED: the server broke the phone contract')


def problem_line(problems):
    if not problems['count']:
        return 'none'
    return '%d: %s' % (problems['count'], ', '.join('%s %d' % item for item in problems['by_kind'].items()))


def database_for(ctx, db):
    """(database, data dir) for --seed-work: --db, else what the enclosing
    `xhs-server --db ... --data-dir ...` chose, else XHS_DB or the default."""
    root = ctx.find_root().obj if isinstance(ctx.find_root().obj, dict) else {}
    db = db or root.get('db') or os.environ.get('XHS_DB', './data/xhs.db')
    if not os.path.isfile(db):
        # The CLI would create an empty database the server never reads.
        raise click.BadParameter('no database at %s: give the server\'s database' % db, param_hint='--db')
    return db, root.get('data_dir')


@click.command()
@click.option('--url', required=True, help='The server, as phones reach it: http://HOST:PORT')
@click.option('--phones', default=5, show_default=True, type=click.IntRange(1, 1000),
              help='Virtual phones (one thread each, plus a watchdog).')
@click.option('--minutes', type=click.FloatRange(0.05), help='Run this many minutes.')
@click.option('--seconds', type=click.FloatRange(1), help='Run this many seconds (default 30).')
@click.option('--seed', default=1, show_default=True, type=int,
              help='Makes SIMs, MACs and every choice reproducible.')
@click.option('--json', 'as_json', is_flag=True, help='Print the summary as one JSON object.')
@click.option('--seed-work', is_flag=True,
              help='Queue work first and during the run (numbers, profiles, notes, DM replies, '
                   'comment replies and deletions) with the operator CLI against --db.')
@click.option('--db', default=None, help='The server\'s database, for --seed-work (default: XHS_DB '
                                        'or ./data/xhs.db).')
@click.pass_context
def simulate(ctx, url, phones, minutes, seconds, seed, as_json, seed_work, db):
    """Run virtual phones against a server and check it keeps the phone API contract.

    Each phone plays a phone script's day in compressed time: logs, registers
    an account (profile, number, SMS code), publishes notes, uploads DM and
    article screenshots, answers DM replies and comment tasks, rests, and a
    watchdog asks whether it is alive. Exits 1 when the server broke a promise
    of the contract, 2 when it could not be reached.

    Example: xhs-server simulate --url http://127.0.0.1:8000 --phones 5 --seed-work --db ./data/xhs.db
    """
    duration = seconds if seconds is not None else (minutes * 60 if minutes is not None else 30.0)
    db, data_dir = database_for(ctx, db) if seed_work else (None, None)
    if seed_work and not reachable(url):
        click.echo('Error: no server answers at %s; nothing seeded' % url, err=True)
        ctx.exit(2)
    click.echo('simulating %d phones for %gs against %s…' % (phones, duration, url), err=True)
    result = run_simulation(url, phones, duration, seed, seed_work, db, data_dir)
    if as_json:
        click.echo(json.dumps(result, ensure_ascii=False, indent=1))
    else:
        print_table(result)
    ctx.exit(0 if result['ok'] else (2 if not result['reached'] else 1))


if __name__ == '__main__':
    simulate()
