"""Notifications: tell each set's subscribers about every stored bundle.

BundleSet calls :meth:`Notifier.published` only after a bundle's object and
its manifest are both stored, so a notice never names a missing object. The
notice goes to the bundle's own set's channels only: one mail per list
address (:mod:`spamtrap.notify.mail`) and one POST per webhook
(:mod:`spamtrap.notify.webhook`).

Nothing here can slow intake or the store: ``published`` only starts
deliveries and returns; each delivery runs on its own, is retried with
exponential backoff and jitter on the injected clock, and ends as sent or
failed, logged with its set, key and channel and counted in
``spamtrap_notifications{channel, outcome}``. A delivery gives up once its
next attempt would start more than GIVE_UP_AFTER after its first. Notices
live in memory only: a stop or a crash forgets the ones still waiting.

Every notice carries the bundle's download URL and its manifest's URL:
the store's own public URL (S3), or else, for the local store, the URL at
which this node's web server serves the bundle, ``http.public_url`` +
``/bundles/<key>``, as the web layer's listings and feeds do (one rule, in
:mod:`spamtrap.store.published`). An S3 store without a URL for the bundle (AWS,
region not known yet) gives notices without URLs and one logged error per
bundle: this node's web server could only redirect to that missing URL.

Privacy: a private set's channels may not also be another set's channels
(a ValueError at construction), so a private set's bundle URLs reach only
its own subscribers.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable
from functools import partial
from typing import Any
from urllib.parse import urlsplit

from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from spamtrap import retry
from spamtrap.bundle.manifest import Published
from spamtrap.config import Config, SetConfig, WebhookConfig
from spamtrap.interfaces import DelayedCall, NetworkReactor, NoticeChannel, ReactorTime, pick_clock
from spamtrap.metrics import Metrics
from spamtrap.notify import mail, webhook
from spamtrap.smtp_client import Connect, is_loopback
from spamtrap.store import BUNDLE_SUFFIX, MANIFEST_SUFFIX, served_by_web
from spamtrap.store.published import download_url

log = Logger()

GIVE_UP_AFTER = 24 * 3600.0
STOP_DEADLINE = 10.0  # stop() waits this long for sends in flight
# Deliveries held (in flight or waiting to retry) before the oldest waiting
# one is dropped: a long outage must not grow memory without bound, and a
# fresh notice is worth more than a day-old one.
MAX_PENDING = 10_000
MAIL_RETRY_FIRST = 10.0  # then doubling up to relay.retry_max
WEBHOOK_RETRY_FIRST = 2.0
WEBHOOK_RETRY_MAX = 600.0


class _Delivery:
    """One notice to one channel, through its attempts."""

    def __init__(
        self,
        channel: str,
        set_name: str,
        key: str,
        target: str,
        attempt: Callable[[], Deferred[None]],
        permanent: Callable[[Failure], bool],
        describe: Callable[[Failure], str],
        retry_first: float,
        retry_max: float,
    ) -> None:
        self.channel = channel
        self.set_name = set_name
        self.key = key
        self.target = target  # for logs: the address, or the URL without query
        self.attempt = attempt
        self.permanent = permanent
        self.describe = describe
        self.retry_first = retry_first
        self.retry_max = retry_max
        self.started = 0.0
        self.attempts = 0
        self.call: DelayedCall | None = None  # the scheduled retry
        self.inflight: Deferred[None] | None = None


def _never_permanent(failure: Failure) -> bool:
    # Webhooks retry every failure, 4xx included: a receiver answering 404
    # or 401 is most often being redeployed, and GIVE_UP_AFTER bounds it.
    return False


def _describe(failure: Failure) -> str:
    return failure.getErrorMessage() or repr(failure.value)


def check_private_channels(sets: Iterable[SetConfig]) -> None:
    """Refuse a private set whose list address or webhook another set uses:
    that set's subscribers would learn the private set's bundle URLs."""
    sets = list(sets)
    owners: dict[tuple[str, str], set[str]] = {}
    for s in sets:
        for address in s.notify.mail:
            owners.setdefault(("mail", address.lower()), set()).add(s.name)
        for hook in s.notify.webhooks:
            owners.setdefault(("webhook", hook.url), set()).add(s.name)
    for s in sets:
        if not s.private:
            continue
        channels = [("mail", a.lower()) for a in s.notify.mail]
        channels += [("webhook", h.url) for h in s.notify.webhooks]
        for channel in channels:
            others = sorted(owners[channel] - {s.name})
            if others:
                raise ValueError(
                    f"set {s.name!r} is private, but its {channel[0]} channel "
                    f"{webhook.describe_url(channel[1])} also serves set(s) {', '.join(others)}"
                )


def notice_urls(
    published: Published, public_url: str, web_served: bool = True
) -> tuple[str | None, str | None]:
    """The bundle's download URL and its manifest's: the store's own URL
    (``published.url``, set by BundleSet from ``store.url``) if it has
    one, else, if this node's web server serves the store (``web_served``:
    the local store), its ``/bundles/<key>`` under ``public_url``; else
    neither (see :mod:`spamtrap.store.published`)."""
    url = download_url(published.manifest.key, published.url, public_url, web_served)
    if url is None:
        return None, None
    path = urlsplit(url).path
    # The manifest sits beside the bundle under the same name (both stores,
    # and this node's web server, serve it there). A URL whose path does not
    # end in the bundle's name (a presigned or rewritten one) gets none.
    if path.endswith(BUNDLE_SUFFIX) and url.endswith(BUNDLE_SUFFIX):
        return url, url[: -len(BUNDLE_SUFFIX)] + MANIFEST_SUFFIX
    return url, None


def listen_port(description: str) -> int | None:
    """The TCP port of a server endpoint description (``tcp:8025``,
    ``tcp6:port=8025:interface=::1``, ``ssl:443:...``), None for others."""
    kind, _, rest = description.partition(":")
    if kind not in ("tcp", "tcp6", "ssl"):
        return None
    for i, arg in enumerate(rest.split(":")):
        name, eq, value = arg.partition("=")
        if eq and name == "port":
            return int(value) if value.isdigit() else None
        if not eq and i == 0:
            return int(arg) if arg.isdigit() else None
    return None


def _bucket_and_prefix(store_url: str | None) -> tuple[str, str]:
    parts = urlsplit(store_url or "")
    if parts.scheme == "s3":
        return parts.netloc, parts.path.strip("/")
    return "local", ""


class Notifier:
    def __init__(
        self,
        config: Config,
        metrics: Metrics,
        reactor: NetworkReactor,
        clock: ReactorTime | None = None,
        http_client: Any = None,
        smtp_connect: Connect | None = None,
        *,
        client_tls: Callable[[str], Any] | None = None,
        rng: random.Random | None = None,
        max_pending: int = MAX_PENDING,
    ) -> None:
        """``http_client`` is treq-like (treq.client.HTTPClient, StubTreq);
        ``smtp_connect(host, port, factory)`` replaces reactor.connectTCP;
        ``client_tls(hostname)`` replaces optionsForClientTLS for STARTTLS.
        Raises ValueError for unsafe relay or privacy settings."""
        check_private_channels(config.sets)
        self._clock = pick_clock(clock, reactor)
        self._sets = {s.name: s for s in config.sets}
        self._relay = config.relay
        self._mail: NoticeChannel[str] | None = None
        if any(s.notify.mail for s in config.sets):
            self._mail = mail.MailSender(
                config.relay, reactor, self._clock, config.smtp.hostname, smtp_connect, client_tls
            )
        self._webhook: NoticeChannel[WebhookConfig] | None = None
        if any(s.notify.webhooks for s in config.sets):
            if http_client is None:
                http_client = _default_http_client(reactor)
            self._webhook = webhook.WebhookSender(http_client, self._clock)
        self._bucket, self._prefix = _bucket_and_prefix(config.store.url)
        self._public_url = config.http.public_url
        self._web_served = served_by_web(config.store.url)
        if self._mail is not None or self._webhook is not None:
            self._warn_unreachable(config)
        # Until metrics.py has the counter, notices are logged only.
        self._counter = getattr(metrics, "notifications", None)
        self._rng = rng if rng is not None else random.Random()
        self._max_pending = max_pending
        self._active: dict[_Delivery, None] = {}  # insertion order: oldest first
        self._stopped = False
        self._stop_timer: DelayedCall | None = None
        self._stop_waiters: list[Deferred[None]] = []

    def _warn_unreachable(self, config: Config) -> None:
        """Log what makes the notices' URLs unusable: they point at this
        node's web server (any store but S3), and a loopback public_url
        (the default http://localhost:8025) reaches it only from this
        machine, and only if HTTP listens on that port."""
        if not self._web_served:
            return
        parts = urlsplit(self._public_url)
        if not is_loopback(parts.hostname or ""):
            return  # a proxy or another port in front is the operator's business
        port = parts.port or (443 if parts.scheme == "https" else 80)
        ports = [p for p in map(listen_port, config.http.listen) if p is not None]
        if ports and port not in ports:
            log.warn(
                "notify: http.public_url {url} names port {port}, but HTTP listens on "
                "{listen}: the URLs in notices lead nowhere; set http.public_url",
                url=self._public_url,
                port=port,
                listen=", ".join(config.http.listen),
            )
        else:
            log.warn(
                "notify: http.public_url is {url}, a loopback address: the URLs in "
                "notices work only on this machine; set http.public_url to the "
                "address consumers download from",
                url=self._public_url,
            )

    # -- starting deliveries -------------------------------------------------

    def published(self, published: Published) -> None:
        """BundleSet's on_published hook: announce one stored bundle. Never
        raises and never waits; the deliveries go on by themselves."""
        try:
            self._announce(published)
        except Exception:  # noqa: BLE001 - a notice must never break the store path
            known = getattr(published, "manifest", None)
            log.failure(
                "notify: cannot announce {key} of set {set}",
                set=getattr(known, "set", None),
                key=getattr(known, "key", None),
            )

    def _announce(self, published: Published) -> None:
        name, key = published.manifest.set, published.manifest.key
        if self._stopped:
            log.warn("notify: stopping; {key} of set {set} not announced", set=name, key=key)
            return
        set_config = self._sets.get(name)
        if set_config is None:
            log.warn("notify: no set {set} configured; {key} not announced", set=name, key=key)
            return
        url, manifest_url = notice_urls(published, self._public_url, self._web_served)
        if url is None and (set_config.notify.mail or set_config.notify.webhooks):
            # Once per bundle, not per channel. The notices still go out
            # (subscribers learn that the bundle exists, and spamtrap pull
            # reports a notice without a URL), but none can lead anywhere.
            log.error(
                "notify: the store has no public URL for {key} (set {set}), so its "
                "notices carry none; set store.public_url or store.region",
                set=name,
                key=key,
            )
        # The notice as its JSON object (the webhook's "spamtrap" record, the
        # mail's fields): the manifest's keys in order, then the two URLs.
        manifest: dict[str, object] = {
            **published.manifest.to_dict(),
            "url": url,
            "manifest_url": manifest_url,
        }
        now = self._clock.seconds()
        # Every body is built before any delivery starts: a bad manifest
        # fails the whole notice rather than half of it.
        deliveries = []
        for address in set_config.notify.mail:
            assert self._mail is not None  # built whenever a set has addresses
            message = mail.notice(manifest, self._relay.sender, address, now)
            deliveries.append(
                _Delivery(
                    "mail",
                    name,
                    key,
                    address,
                    partial(self._mail.send, address, message),
                    mail.is_permanent,
                    mail.describe_error,
                    MAIL_RETRY_FIRST,
                    self._relay.retry_max,
                )
            )
        for hook in set_config.notify.webhooks:
            assert self._webhook is not None  # built whenever a set has webhooks
            object_key = f"{self._prefix}/{key}" if self._prefix else key
            body = webhook.event(manifest, now, self._bucket, object_key)
            deliveries.append(
                _Delivery(
                    "webhook",
                    name,
                    key,
                    webhook.describe_url(hook.url),
                    partial(self._webhook.send, hook, body),
                    _never_permanent,
                    _describe,
                    WEBHOOK_RETRY_FIRST,
                    WEBHOOK_RETRY_MAX,
                )
            )
        for d in deliveries:
            self._shed()
            d.started = now
            self._active[d] = None
            self._attempt(d)

    def _shed(self) -> None:
        while len(self._active) >= self._max_pending:
            waiting = next((d for d in self._active if d.call is not None), None)
            if waiting is None:
                return  # all in flight: each ends within its attempt timeout
            self._give_up(waiting, "dropped for newer notices (too many pending)")

    # -- attempts --------------------------------------------------------------

    def _attempt(self, d: _Delivery) -> None:
        d.call = None
        d.attempts += 1
        # Set before the callbacks: a synchronous failure clears it again.
        d.inflight = attempt = maybeDeferred(d.attempt)
        attempt.addCallbacks(self._sent, self._failed, callbackArgs=(d,), errbackArgs=(d,))
        attempt.addErrback(
            lambda f: log.failure("notify: handling a {channel} result", f, channel=d.channel)
        )

    def _sent(self, _: object, d: _Delivery) -> None:
        d.inflight = None
        self._count(d.channel, "sent")
        log.info(
            "notify: {channel} notice of {key} (set {set}) sent to {target}",
            channel=d.channel,
            key=d.key,
            set=d.set_name,
            target=d.target,
        )
        self._done(d)

    def _failed(self, failure: Failure, d: _Delivery) -> None:
        d.inflight = None
        error = d.describe(failure)
        if self._stopped:
            self._give_up(d, f"stopped during attempt {d.attempts}: {error}")
            return
        if d.permanent(failure):
            self._give_up(d, f"permanent error: {error}")
            return
        # Jitter in [base/2, base]: many nodes do not retry in step.
        delay = retry.backoff(d.retry_first, d.retry_max, d.attempts, self._rng)
        if self._clock.seconds() + delay - d.started > GIVE_UP_AFTER:
            self._give_up(d, f"gave up after {d.attempts} attempts, last: {error}")
            return
        self._count(d.channel, "retry")
        log.warn(
            "notify: {channel} notice of {key} (set {set}) to {target} failed "
            "(attempt {attempt}): {error}; retry in {delay:.0f}s",
            channel=d.channel,
            key=d.key,
            set=d.set_name,
            target=d.target,
            attempt=d.attempts,
            error=error,
            delay=delay,
        )
        d.call = self._clock.callLater(delay, self._attempt, d)

    def _give_up(self, d: _Delivery, why: str) -> None:
        if d.call is not None:
            d.call.cancel()
            d.call = None
        self._count(d.channel, "failed")
        log.error(
            "notify: {channel} notice of {key} (set {set}) to {target} not sent: {why}",
            channel=d.channel,
            key=d.key,
            set=d.set_name,
            target=d.target,
            why=why,
        )
        self._done(d)

    def _done(self, d: _Delivery) -> None:
        self._active.pop(d, None)
        if self._stopped and not self._active:
            if self._stop_timer is not None and self._stop_timer.active():
                self._stop_timer.cancel()
            waiters, self._stop_waiters = self._stop_waiters, []
            for w in waiters:
                w.callback(None)

    def _count(self, channel: str, outcome: str) -> None:
        if self._counter is not None:
            self._counter.labels(channel=channel, outcome=outcome).inc()

    # -- stopping --------------------------------------------------------------

    def stop(self) -> Deferred[None]:
        """Drop the notices waiting to retry, give the sends in flight up to
        STOP_DEADLINE to finish, then cancel them. Never fails."""
        if not self._stopped:
            self._stopped = True
            for d in [d for d in self._active if d.call is not None]:
                self._give_up(d, "stopping before the retry")
            if self._active:
                self._stop_timer = self._clock.callLater(STOP_DEADLINE, self._cancel_inflight)
        if not self._active:
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._stop_waiters.append(waiter)
        return waiter

    def _cancel_inflight(self) -> None:
        for d in list(self._active):
            if d.inflight is not None:
                d.inflight.cancel()  # -> _failed -> _give_up


def _default_http_client(reactor: NetworkReactor) -> Any:
    from treq.client import HTTPClient
    from twisted.web.client import Agent, HTTPConnectionPool

    # One connection per notice: webhooks are rare, and no idle connection
    # outlives a stop.
    pool = HTTPConnectionPool(reactor, persistent=False)
    agent: Any = Agent(reactor, pool=pool)  # an IAgent; zope interfaces do not type-check
    return HTTPClient(agent)
