"""The server's background watch: phone activity history, alerts, retention.

One thread looks at the database every few seconds and notices what needs the
operator: a phone that went quiet (and came back), a handed-out task left
unfinished too long, a failed comment deletion, a log line reporting a known
failure. Each becomes a PhoneEvent row and/or an alert; a second thread posts
alerts to the group robot, with retries, so a dead webhook never slows phones.
It also applies screenshot retention once an hour, and removes temporary image
files and images no row names that a killed server or a full disk left behind.
"""
import json
import logging
import queue
import re
import threading
import time
import urllib.error
import urllib.request

import models
from models import db, now

log = logging.getLogger('xhs_server')

# Log lines that mean a phone script failed at something the operator must see.
KNOWN_FAILURES = ('没有找到回复私信用户',)
RETRIES = (1, 5, 30)          # seconds before each further attempt
SEND_TIMEOUT = 5
RETENTION_EVERY = 3600


def robot_payload(url, text):
    """The text-message JSON each group robot accepts (WeCom, DingTalk, Feishu/Lark)."""
    if re.search(r'//open\.(feishu\.cn|larksuite\.com)/', url):
        return {'msg_type': 'text', 'content': {'text': text}}
    if re.search(r'//(qyapi\.weixin\.qq\.com|oapi\.dingtalk\.com)/', url):
        return {'msgtype': 'text', 'text': {'content': text}}
    # An unknown host (a relay, a test receiver) gets both shapes in one object.
    return {'msgtype': 'text', 'text': {'content': text},
            'msg_type': 'text', 'content': {'text': text}}


def robot_accepted(body):
    """Robots answer HTTP 200 with an error code in the body when they refuse."""
    try:
        answer = json.loads(body or b'{}')
    except ValueError:
        return True
    if not isinstance(answer, dict):
        return True
    code = answer.get('errcode', answer.get('code', answer.get('StatusCode', 0)))
    return code in (0, None, '0')


class AlertSender(threading.Thread):
    """Posts queued alert texts to the webhook, retrying; drops the oldest when flooded."""

    def __init__(self, webhook):
        super().__init__(name='xhs-alerts', daemon=True)
        self.webhook = webhook
        self.queue = queue.Queue(maxsize=1000)
        self.sent = 0

    def send(self, text):
        if not self.webhook():
            return
        while True:
            try:
                self.queue.put_nowait(text)
                return
            except queue.Full:
                self.queue.get_nowait()

    def run(self):
        while True:
            text = self.queue.get()
            if text is None:
                return
            self.deliver(text)

    def deliver(self, text):
        for pause in RETRIES + (None,):
            url = self.webhook()
            if not url:
                return
            try:
                if self.post(url, text):
                    self.sent += 1
                    return
            except (OSError, urllib.error.URLError, ValueError) as error:
                log.warning('alert webhook failed: %s', error)
            if pause is None:
                log.error('alert dropped after %d attempts', len(RETRIES) + 1)
                return
            time.sleep(pause)

    def post(self, url, text):
        body = json.dumps(robot_payload(url, text), ensure_ascii=False).encode('utf-8')
        request = urllib.request.Request(url, body, {'Content-Type': 'application/json; charset=utf-8'})
        with urllib.request.urlopen(request, timeout=SEND_TIMEOUT) as answer:
            return robot_accepted(answer.read())

    def stop(self):
        self.queue.put(None)


class Monitor(threading.Thread):
    """Scans the database every `interval` seconds; see the module docstring."""

    def __init__(self, interval=15.0, webhook=None):
        super().__init__(name='xhs-monitor', daemon=True)
        self.interval = interval
        self.override = webhook
        self.sender = AlertSender(self.webhook)
        self.stopping = threading.Event()
        self.last_alert = {}       # (phone or subject, kind) -> time of the last alert
        self.alerted_tasks = set()
        self.last_log_id = None
        self.last_failure_at = None
        self.last_retention = None   # monotonic time of the last pass; the first is at start

    def webhook(self):
        return self.override or models.settings()['alert_webhook']

    def run(self):
        self.sender.start()
        while not self.stopping.wait(self.interval if self.last_log_id is not None else 0):
            try:
                self.scan()
            except Exception:  # a bad scan must not end the watch
                log.exception('monitor scan failed')

    def stop(self):
        self.stopping.set()
        self.sender.stop()

    def scan(self):
        if self.last_log_id is None:
            self.last_log_id = db.execute_sql('SELECT COALESCE(MAX(id), 0) FROM log').fetchone()[0]
            self.last_failure_at = now()
        for watch in (self.watch_activity, self.watch_stuck_tasks, self.watch_failed_deletions,
                      self.watch_logs, self.retention_due):
            try:   # one failing (a full disk, say) must not stop the others
                watch()
            except Exception:
                log.exception('monitor: %s failed', watch.__name__)

    def retention_due(self):
        if self.last_retention is None or time.monotonic() - self.last_retention > RETENTION_EVERY:
            self.last_retention = time.monotonic()
            self.apply_retention()

    def alert(self, subject, kind, text):
        """Queue an alert unless one of this kind about this subject went out recently."""
        at = now()
        every = models.settings()['alert_every'] * 60
        if at - self.last_alert.get((subject, kind), -1e12) < every:
            return
        self.last_alert[(subject, kind)] = at
        self.sender.send('[xhs-server] ' + text)

    def watch_activity(self):
        """Record each phone's change between active and inactive, and say so."""
        at = now()
        window = models.settings()['activity_window'] * 60
        last_event = dict(db.execute_sql(
            'SELECT phone_id, event FROM phone_event e WHERE id = '
            '(SELECT MAX(id) FROM phone_event WHERE phone_id = e.phone_id)').fetchall())
        for phone_id, label, last_seen in db.execute_sql(
                'SELECT id, COALESCE(label, imsi, mac), last_seen FROM phone '
                'WHERE last_seen IS NOT NULL AND approved AND NOT offline').fetchall():
            state = 'active' if at - last_seen <= window else 'inactive'
            if last_event.get(phone_id, 'active') == state:
                continue
            models.PhoneEvent.create(phone=phone_id, at=at, event=state)
            if state == 'inactive':
                self.alert(phone_id, 'inactive', '手机 %s 已超过 %d 分钟无活动（最后活动 %s）'
                           % (label, window // 60, models.fmt_time(last_seen)))
            else:
                self.alert(phone_id, 'active', '手机 %s 已恢复活动' % label)

    def watch_stuck_tasks(self):
        cutoff = now() - models.settings()['stuck_minutes'] * 60
        rows = db.execute_sql(
            "SELECT t.id, t.kind, COALESCE(p.label, p.imsi), t.claimed_at, t.claimed_by_id FROM task t "
            "JOIN phone p ON p.id = t.claimed_by_id WHERE t.status = 'claimed' AND t.claimed_at < ?",
            (cutoff,)).fetchall()
        still = set()
        for task_id, kind, label, claimed_at, phone_id in rows:
            still.add(task_id)
            if task_id not in self.alerted_tasks:
                self.alerted_tasks.add(task_id)
                self.alert(task_id, 'stuck', '任务 #%d（%s）自 %s 交给手机 %s 后仍未完成'
                           % (task_id, kind, models.fmt_time(claimed_at), label))
        self.alerted_tasks &= still

    def watch_failed_deletions(self):
        since, self.last_failure_at = self.last_failure_at, now()
        for comment_id, nick, label, phone_id in db.execute_sql(
                "SELECT c.id, c.nick_name, COALESCE(p.label, p.imsi), c.phone_id FROM comment c "
                "JOIN phone p ON p.id = c.phone_id WHERE c.delete_state = 'failed' "
                'AND c.delete_done_at >= ?', (since,)).fetchall():
            self.alert(comment_id, 'delete_failed', '手机 %s 删除评论 #%d（%s）失败'
                       % (label, comment_id, nick))

    def watch_logs(self):
        top = db.execute_sql('SELECT COALESCE(MAX(id), 0) FROM log').fetchone()[0]
        rows = db.execute_sql(
            'SELECT l.msg, l.phone_id, COALESCE(p.label, p.imsi, p.mac, l.imsi, l.macaddr) '
            'FROM log l LEFT JOIN phone p ON p.id = l.phone_id WHERE l.id > ? AND l.id <= ? AND (%s) '
            'ORDER BY l.id' % ' OR '.join('instr(l.msg, ?)' for _ in KNOWN_FAILURES),
            (self.last_log_id, top) + KNOWN_FAILURES).fetchall()
        self.last_log_id = top
        for msg, phone_id, who in rows:
            failure = next(word for word in KNOWN_FAILURES if word in msg)
            self.alert(phone_id or who, failure, '手机 %s 报告：%s' % (who or '?', msg[:200]))

    def apply_retention(self):
        stale = models.remove_stale_temp()
        if stale:
            log.info('removed %d temporary image files left by a crash', stale)
        orphans = models.remove_orphan_images()
        if orphans:
            log.info('removed %d image files no row names (left by failed uploads)', orphans)
        days = models.settings()['screenshot_retention_days']
        if days:
            removed = sum(models.prune_screenshots(now() - days * 86400))
            if removed:
                log.info('retention: removed %d screenshots older than %d days', removed, days)
