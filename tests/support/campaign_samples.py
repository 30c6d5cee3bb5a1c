"""Near-copies of spam templates, as bulk mailers personalise them, for the
campaign tests (spamtrap/work/campaign.py)."""

from __future__ import annotations

import base64
import random
from email.utils import formatdate

# Five templates that share their everyday words, as spam of one genre does.
TEMPLATES = [
    "We are pleased to tell you that your mortgage application was approved at a rate"
    " far below what your bank offers. Our brokers compare thirty lenders for you and"
    " the approval takes minutes. Reply today and lock the rate before it moves again.",
    "Your pharmacy order is ready. Genuine medication shipped discreetly from licensed"
    " pharmacies, no prescription needed, delivered to your door within days. Visit"
    " our online store and save on every order you place this month.",
    "Congratulations, your email address was selected in our international lottery"
    " draw. To claim your prize send your full name, address and telephone number to"
    " the claims agent below. Keep this notice confidential until the claim is paid.",
    "Meet lonely singles in your area tonight. Thousands of new profiles every week,"
    " photos verified, chat for free. Create your profile in one minute and see who"
    " is waiting to hear from you right now.",
    "Dear beneficiary, I am a bank manager and I have an urgent and confidential"
    " business proposal for you concerning the transfer of funds left by a deceased"
    " client who shares your surname. Reply for the details of this transaction.",
]
NAMES = ["Alice", "Bob", "Carol", "Dave", "Erin", "Frank", "Grace", "Heidi"]
FILLER = ["lantern", "pebble", "orchid", "quarry", "saddle", "thimble", "walnut", "zephyr"]


def near_copy(template: int, n: int, *, encoding: str = "7bit", html: bool = False) -> bytes:
    """A copy of a template the way a bulk mailer personalises it."""
    rng = random.Random(template * 1000 + n)
    name = rng.choice(NAMES)
    words = TEMPLATES[template].split()
    for _ in range(rng.randint(1, 3)):  # hash-busting words
        words.insert(rng.randrange(len(words)), rng.choice(FILLER))
    token = f"{rng.getrandbits(96):024x}"
    text = (
        f"Dear {name},\n\n{' '.join(words)}\n\n"
        f"http://offers.example/c/{token}?r={base64.b64encode(rng.randbytes(12)).decode()}\n"
        f"Order ref {rng.randint(10**5, 10**9)}\n"
    )
    if html:
        text = "<html><body>" + "".join(f"<p>{line}</p>" for line in text.split("\n")) + "</body>"
    body = text.encode()
    if encoding == "base64":
        body = base64.encodebytes(body)
    head = (
        f"Message-ID: <{token}@mailer.example>\r\n"
        f"Date: {formatdate(1_790_000_000 + rng.randint(0, 9999))}\r\n"
        f"To: {name.lower()}{n}@trap.example\r\n"
        f"Subject: An offer for you, {name}\r\n"
        f"Content-Type: text/{'html' if html else 'plain'}; charset=utf-8\r\n"
        f"Content-Transfer-Encoding: {encoding}\r\n\r\n"
    )
    return head.encode() + body.replace(b"\n", b"\r\n")
