r"""The rules of stage "bounce" (spamtrap.filters.bounce): what a bounce,
an auto-reply, a challenge or a virus notice looks like, as tables of
regexps. The stage's docstring says what each rule covers and why, and
how the body rules' anchors keep the scan fast; every regexp here must
run in linear time on any input (tests/unit/test_hostile_content.py).

A rule is ``(group, regexp)``: the group names its reason (``REASONS``).
Many rules of one kind are compiled into one alternation with a named group
per rule (:func:`alternation`), and :func:`reason_of` reads the reason off
a match.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

_I = re.IGNORECASE

# A rule's group name says its reason.
REASONS = {
    "dsn": "dsn",
    "arf": "arf",
    "autoreply": "autoreply",
    "challenge": "challenge",
    "virus_notice": "virus-notice",
    "bounce_subject": "bounce:subject",
    "bounce_body": "bounce:body",
}


# -- subject (decoded, white space collapsed) --------------------------------
# Most rules say how a subject starts (matched at its start only, which is
# cheap); a few may match anywhere.

SUBJECT_START: list[tuple[str, str]] = [
    # virus scanners (SpamAssassin __VBOUNCE_* subjects, and more)
    ("virus_notice", r"(?:virus|malware|worm) (?:alert|detected|found|warning|notification"
     r"|in your mail|to sender)\b|warning:\s*e-?mail virus|warning - you sent a virus"
     r"|(?:norton anti.?virus|nav) (?:detected|failed)|symantec (?:avf|e-mail-proxy)"
     r"|antigen found\b|mcafee groupshield alert|rav anti.?virus scan results"
     r"|scan.?mail message: .{0,30} virus found|failed to clean virus\b|content violation"
     r"|disallowed attachment type found|virusmelding$|banned or potentially offensive"
     r" material|inflex scan report \[|interscan (?:nt alert|mss for smtp has delivered a"
     r" message)|email rejected\b|mailmarshal has detected|report to sender$"
     r"|\[mail delivery .{20,100} infected attachment +removed|gwava sender notification"
     r"|\[mailserver notification\]|\*\*\*\s*mensagem bloqueada"
     r"|delivery (?:warning|error) report id=|message undeliverable: possible junk/spam"
     r"|spam rapport / spam report \S+ -\s+\(\S+\)$|the mime information you requested"
     r"|mms notification|undeliverable mail, invalid characters in header"
     r"|messagerie .{1,100} : probl[èe]me de s[ée]curit[ée]"),
    # MTA bounces (SpamAssassin __BOUNCE_* subjects, and more). Not a bare
    # "Undeliverable": spam uses that (spam-2 00825, "Undeliverable  JPTJ").
    ("bounce_subject", r"undeliverable(?: -|:|,| mail\b| message\b| e-?mail\b)"
     r"|undelivered (?:mail|message|e-?mail)\b|(?:mail|message|e-?mail) undeliverable\b"
     r"|returned (?:mail|message|e-?mail)\b"
     r"|(?:[\w.-]+ )?(?:mail |e-?mail |message )?delivery (?:status notification|failure"
     r"|failed|has failed|problem|error|delayed|status)"
     r"|(?:mail|message|e-?mail) (?:delivery )?(?:failed|failure|returned|bounced"
     r"|not delivered)\b"
     r"|(?:sorry,? )?(?:your )?(?:mail|message|e-?mail) (?:could not|cannot|can't|couldn't"
     r"|was not|wasn't) (?:be )?delivered\b"
     r"|failure notice\b|failure delivery\b|failed delivery\b|non-?deliver(?:y|able)\b"
     r"|(?:warning: )?could not send message for past|warning: message .{1,80} delayed\b"
     r"|delayed mail\b|mail system error\b|postmaster notify\b|notice: mail delivery status"
     r"|message status - undeliverable|e-mail addressing error \(|no valid recipient in "
     r"|delivery notification: delivery has"
     r"|\*\*message you sent blocked by our bulk email filter\*\*$"
     r"|bounced (?:mail|message)\b|message not delivered\b"),
    # the same in other languages
    ("bounce_subject", r"unzustellbar|nicht zustellbar|unzustellbare nachricht"
     r"|(?:übermittlungs|zustellungs)status|fehler bei der (?:nachrichten)?zustellung"
     r"|non remis|non distribuable|notification d.[ée]tat de (?:la )?distribution"
     r"|(?:message )?non d[ée]livr[ée]|[ée]chec de (?:la )?(?:remise|livraison|distribution)"
     r"|no se (?:puede|pudo|ha podido) entregar|(?:mensaje )?no entregado|imposible entregar"
     r"|notificaci[óo]n de estado de (?:la )?entrega|non recapitabile|impossibile recapitare"
     r"|(?:messaggio )?non consegnato|(?:mensagem )?n[ãa]o (?:entregue|pode ser entregue)"
     r"|onbestelbaar|niet bezorgd|onbezorgbaar|olevererbart|(?:kunne|kan) ikke leveres"
     r"|ikke leveret|ei voitu toimittaa|niedostarczon|nie mo[żz]na dostarczy[ćc]"
     r"|nedoru[čc]iteln|недоставленное сообщение|(?:ваше )?сообщение не доставлено"),
    # complaint reports that are not multipart/report (Hotmail JMRP and such)
    ("arf", r"complaint about message from\b|(?:email )?(?:abuse|feedback) report\b"),
    # challenge-response (SpamAssassin __CRBOUNCE_* subjects, and more)
    ("challenge", r"your email requires verification verify:\S|unverified email to "
     r"|please confirm your (?:message|e-?mail)\b|spam ?arrest\b"),
    # auto-replies and out-of-office (SpamAssassin __BOUNCE_OOO_S*, __BOUNCE_AUTO_*)
    ("autoreply", r"auto(?:matic(?:ally generated)?)?[- ]?(?:reply|response|answer"
     r"|respon[sd]e?r?)\b|automated (?:reply|response)\b|auto-respond e-mail from"
     r"|yahoo! auto response|out of (?:the )?office\b|vacation (?:reply|notice|message|auto)"
     r"|r[ée]ponse automatique|absence du bureau|abwesenheitsnotiz|abwesenheit\b"
     r"|automatische antwort|nicht im büro|risposta automatica|fuori (?:sede|ufficio)"
     r"|respuesta autom[áa]tica|fuera de la oficina|resposta autom[áa]tica"
     r"|fora do escrit[óo]rio|automatisch antwoord|afwezig\b|autosvar|automatisk svar"
     r"|frånvaro|fravær|automaattinen vastaus|automatyczna odpowied[źz]"
     r"|automatick[áa] odpov[ěe][ďd]|автоответ|автоматический ответ|otomatik yan[ıi]t"),
]
SUBJECT_ANYWHERE: list[tuple[str, str]] = [
    ("virus_notice", r"\bvirus(?:es)? (?:found|detected)\b|\bvirus infected e-?mail\b"
     r"|antivirus scan results|\bfile type forbidden\b|blocked message \(rbl block\)$"
     r"|\bre: ?wicked screensaver\b"),
    ("bounce_subject", r"配信できません|配信されませんでした|配送エラー|未配達|退信|无法投递"
     r"|未能送达"),
    ("challenge", r"\[qurb .\d+\]$|\[spamarrest\]"),
    ("autoreply", r"\b(?:auto[- ]?reply|automatic reply)\b| \(away from the office\)$"
     r"|自動応答|自動返信|自动回复|自動回覆|自動回复"),
]


def alternation(rules: Iterable[tuple[str, str]]) -> str:
    """One regexp with a named group per rule: one scan finds the first hit
    and ``m.lastgroup`` says which rule it was."""
    return "|".join(f"(?P<{group}__{i}>{rx})" for i, (group, rx) in enumerate(rules))


def reason_of(m: re.Match[str] | re.Match[bytes]) -> str:
    return REASONS[(m.lastgroup or "").rsplit("__", 1)[0]]


SUBJECT_START_RX = re.compile(alternation(SUBJECT_START), _I)
SUBJECT_ANYWHERE_RX = re.compile(alternation(SUBJECT_ANYWHERE), _I)

# -- other header fields -----------------------------------------------------

# A mailer-daemon address, in From or as the envelope sender: alone enough.
DAEMON_ADDR = re.compile(r"(?:^|[<\s\"])mail(?:er)?[-_.]?da?ea?mon(?:@|>|$|\s)", _I)
# SpamAssassin __BOUNCE_FROM_DAEMON without its "<>" case (see above): the
# value starts with the address, with no display name before it.
SA_FROM_DAEMON = re.compile(
    r"^(?:mail\S{1,64}?daemon|d[ae][ae]mon|majordomo|postmaster|automated-response|mailadmin"
    r"|mailmaster|surfcontrol|you_got_spammed|smtp.gateway)@|^scanner[^\s@]{0,64}+@",
    _I,
)
# Virus scanners' From (SpamAssassin __BOUNCE_INTERSCAN, __VBOUNCE_FROMPT, ...).
VIRUS_FROM = re.compile(
    r"\binterscan mss notification\b|security.?scan anti.?virus|\bmailsweeper\b"
    r"|\blutherh@stratcom\.com\b",
    _I,
)
# SpamAssassin __BOUNCE_RPATH_MD and friends (Return-Path or envelope sender).
RPATH_DAEMON = re.compile(
    r"(?:mailer-(?:daemon|deamon)|quotaagent|pleaseforward|autoresponder"
    r"|autoresponse-[^\s@]{1,64}+|devnull[^\s@]{0,64}+)@|delete@errmail\."
    r"|alert@notification\.messagelabs\.com",
    _I,
)
# A From that looks like a mail system; spam can say so too, so it only
# counts together with bounce-like content.
DAEMONISH_FROM = re.compile(
    r"(?:^|[<\s\"])(?:postmaster|poostmaster|mail\.delivery\.system)@|<>"
    r"|mail delivery (?:sub)?system",
    _I,
)
CR_SENDERS = re.compile(
    r"@(?:[\w.-]+\.)?(?:spamarrest\.com|boxbe\.com|mailinblack\.com|spamstomp\.com"
    r"|ipermitmail\.com|spamguard\.vanquish\.com)\b|\bverify@0spam\.com\b|\bsiweb@si20\.com\b"
    r"|<(?:spamblocker-challenge|spambush|apd\.sspam|spamhippo|devnull-quarantine)@"
    r"|\bantispam uol\b|<bounce[^\s@]{1,64}+@[^\s@>]{0,255}\.getresponse\.com>",
    _I,
)
CR_FIELDS = frozenset({
    "x-spamarrest-noauth", "x-boxtrapper", "x-bluebottle-request", "x-askversion",
    "x-spamazoid-md", "spamlion", "x-exispam", "x-choicemail-registration-request",
})
AUTOGEN_FIELDS = frozenset({"x-failed-recipients", "x-ms-embedded-report", "x-autogenerated"})

MIME_FIELDS = ("content-type", "content-transfer-encoding")
FIELD_NAMES = {
    "from", "subject", "return-path", "message-id", "precedence", "x-precedence",
    "auto-submitted", "x-autoreply", "x-autorespond", "x-mailer", "x-mailscanner",
    "x-xsp-msgclass", *MIME_FIELDS, *CR_FIELDS, *AUTOGEN_FIELDS,
}
FIELD = re.compile(
    rb"^(" + b"|".join(re.escape(n.encode("ascii")) for n in sorted(FIELD_NAMES))
    + rb")[ \t]*:[ \t]*(.*(?:\r?\n[ \t].*)*)",
    re.IGNORECASE | re.MULTILINE,
)
FOLD = re.compile(rb"\r?\n[ \t]+")

REPORT_TYPES = {
    "delivery-status": "dsn",
    "feedback-report": "arf",
    "disposition-notification": "mdn",
}
PART_REASONS = {
    "message/delivery-status": "dsn",
    "message/global-delivery-status": "dsn",
    "message/feedback-report": "arf",
    "message/disposition-notification": "mdn",
    "message/global-disposition-notification": "mdn",
}
RETURNED_TYPES = frozenset({
    "message/rfc822", "message/global", "text/rfc822-headers", "message/global-headers",
})
# Raw-body mentions of report parts: only then is the MIME walk worth it.
PART_MARKERS = (b"delivery-status", b"feedback-report", b"disposition-notification")

# -- body ----------------------------------------------------------------------
# anchor -> (reason group, regexp) rules. Matched on lower-cased text, so
# all of it is lower case; a regexp runs only where its anchor occurs, and
# sees WINDOW bytes each side of it, so it must contain the anchor.

BODY_RULES: dict[bytes, list[tuple[str, str]]] = {
    # DSN fields written as text (RFC 3464 2.2, 2.3), and MTAs' own words
    b"recipient": [
        ("dsn", r"^(?:final|original)-recipient:\s*rfc822;"),
        ("bounce_body", r"did not reach some or all of the intended recipients"
         r"|did not reach the following recipient"),
    ],
    b"reporting-mta:": [
        ("virus_notice", r"^reporting-mta: norton anti.?virus gateway"),
        ("dsn", r"^reporting-mta:\s*dns;"),
    ],
    b"deliver": [
        ("challenge", r"to release your message for delivery"),
        ("bounce_body", r"created automatically by mail delivery software"
         r"|wasn't able to deliver your message"
         r"|a message that you sent could not\s+be delivered to one or more"
         r"|delivery has failed to these recipients"
         r"|delivery to the following recipients? (?:failed|has failed|has been delayed"
         r"|was delayed)|unable to deliver (?:your )?message to the following address"
         r"|error delivering your mail to|automatically generated delivery status notification"
         r"|your message (?:wasn't|was not|couldn't be|could not be) delivered (?:to|because)"
         r"|message could not be delivered to (?:the following|one or more)"
         r"|smtpmail could not deliver the e-mail"),
    ],
    b"mail system at host": [("bounce_body", r"mail system at host")],
    b"qmail-send program": [("bounce_body", r"qmail-send program")],
    b"inform you that": [
        ("bounce_body", r"i'm sorry to have to inform you that (?:your|the) message"),
    ],
    b"original message": [
        ("bounce_body", r"original message was received at|please do not resend your original"
         r" message\."),
    ],
    b"transcript of": [
        ("bounce_body", r"transcript of session follows|your message could not be sent\.\s+a"
         r" transcript of the attempts"),
    ],
    b"permanent fatal errors": [("bounce_body", r"had permanent fatal errors")],
    b"tried to reach does not exist": [("bounce_body", r"tried to reach does not exist")],
    b"working address": [
        ("bounce_body", r"you have reached a non.?working address\.\s+please check"),
    ],
    b"notificationtype": [
        ("bounce_body", r"notificationtype\\?\"\s*:\s*\\?\"(?:bounce|complaint|delivery)\b"),
    ],
    b"member of this": [("bounce_body", r"you are not (?:a )?member of this (?:mailing )?list")],
    # virus scanners (SpamAssassin __VBOUNCE_* body rules, and more)
    b"you sent": [
        ("bounce_body", r"this report relates to a message you sent"),
        ("virus_notice", r"you sent to \S+ contains the virus|(?:message|e-?mail|mail) you"
         r" sent\b.{0,80}\b(?:contain(?:s|ed)? (?:a |the )?virus|(?:is|was) infected)"),
    ],
    b"virus": [
        ("virus_notice", r"virus\b.{0,60}?\b(?:was |has been )?(?:found|detected) in (?:a |an"
         r" |the |your )?(?:message|e-?mail|mail)|unrepairable virus detected"
         r"|mailsweeper has found that a \S+ \S+ \S+ \S+ one or more virus"
         r"|\bvirus scanner deleted your message\b"
         r"|^found virus \S+ in file \S|antivirus system report|the antivirus module has"
         r"|(?:message|e-?mail|mail) sent by you\b.{0,80}\bcontain(?:s|ed)? (?:a |the )?virus"),
    ],
    b"attachment": [
        ("virus_notice", r"a potentially executable attachment |has stripped one or more"
         r" attachments from the following message|file attachments that are not permitted"
         r"|block dangerous attachments|attachment.{0,40}was deleted|the infected attachment"
         r"|illegal attachment|\bthe attachment was quarantined\b"),
    ],
    b"rejected": [
        ("virus_notice", r"host \S+ said: 5\d\d\s+error: message content rejected"
         r"|reason: rejected by filter"),
    ],
    b"mailsweeper": [("virus_notice", r"blocked by mailsweeper")],
    b"bevatte bijlage besmet": [("virus_notice", r"bevatte bijlage besmet")],
    b"v i r u s": [("virus_notice", r"\bv i r u s\b")],
    b"incident information:": [("virus_notice", r"^incident information:")],
    b"> tvqqaamaaaaeaaaa": [("virus_notice", r"> tvqqaamaaaaeaaaa")],
    b"securiq": [("virus_notice", r"\bgroup securiq.wall\b")],
    # challenge-response systems, auto-responders
    b"your message": [
        ("challenge", r"your message (?:attached below )?(?:is being|has been) held"
         r"|your message (?:\S+ )?is awaiting (?:your )?(?:verification|confirmation)"),
        ("autoreply", r"\bthis is an autoresponder\. i'll never see your message\b"
         r"|\bi ?.m away until .{10,20} and am unable to read your message\b"),
    ],
    b"protected by": [
        ("challenge", r"(?:i am|i'm) protected by (?:spam ?arrest|boxbe|mailinblack|tmda"
         r"|choicemail|sendio|a challenge)"),
    ],
    b"challenge": [("challenge", r"challenge[-/ ]response (?:system|spam|anti-?spam|filter)")],
    b"out of the office": [("autoreply", r"\bi am currently out of the office\b")],
    b"this is an auto": [
        ("autoreply", r"\bthis is an auto(?:matic|mated)?[- ]?(?:reply|response)\b"),
    ],
}
BODY = [
    (anchor, re.compile(alternation(rules).encode("utf-8"), re.MULTILINE))
    for anchor, rules in BODY_RULES.items()
]

# Bounce-like, but spam can say it too: counts only with a daemon-like sender.
WEAK_BODY = re.compile(
    rb"could ?n[o']t be delivered|undeliverable|undelivered|delivery (?:has )?failed"
    rb"|failed to deliver|permanent (?:error|failure)|user unknown|unknown user|no such user"
    rb"|mailbox (?:unavailable|full|not found|does not exist|is full)|address rejected"
    rb"|does not exist|returned to sender|original message|message headers follow"
    rb"|host unknown|delivery status|relay(?:ing)? denied|over quota|could not deliver"
    # Not "^\s*": under MULTILINE that is quadratic on a run of blank lines.
    rb"|unable to deliver|retry timeout exceeded|^[^\S\n]*+[45]\d\d[ -]#?[45]\.\d{1,3}\.\d{1,3}\b"
    rb"|^received: from |^return-path: <|^message-id: <",
    re.MULTILINE,
)
