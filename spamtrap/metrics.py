"""Prometheus metrics, one registry per service (never the global one).

Every counter the components update lives here, so ``/metrics`` documents
itself and two services in one test process do not share numbers.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        # SMTP intake
        self.connections = Counter(
            "spamtrap_smtp_connections", "SMTP connections accepted", registry=r
        )
        self.connections_open = Gauge(
            "spamtrap_smtp_connections_open", "SMTP connections now open", registry=r
        )
        self.connections_refused = Counter(
            "spamtrap_smtp_connections_refused",
            "Connections closed by a host-protection limit",
            ["reason"],
            registry=r,
        )
        self.messages_accepted = Counter(
            "spamtrap_messages_accepted", "Messages answered 250 (durably spooled)", registry=r
        )
        self.bytes_accepted = Counter(
            "spamtrap_bytes_accepted", "Message bytes answered 250", registry=r
        )
        self.messages_rejected = Counter(
            "spamtrap_messages_rejected",
            "Transactions or recipients refused at SMTP",
            ["reason"],
            registry=r,
        )
        self.smtp_errors = Counter(
            "spamtrap_smtp_protocol_errors", "Protocol errors answered", ["kind"], registry=r
        )
        # Spool
        self.spool_depth = Gauge(
            "spamtrap_spool_depth", "Messages spooled and not yet processed", registry=r
        )
        self.spool_bytes = Gauge(
            "spamtrap_spool_bytes", "Bytes of spooled messages not yet processed", registry=r
        )
        self.spool_shed = Counter(
            "spamtrap_spool_shed",
            "Oldest messages dropped because the spool was full or too old",
            ["reason"],
            registry=r,
        )
        self.spool_commits = Counter(
            "spamtrap_spool_commits", "Group commits (fsyncs) of the spool", registry=r
        )
        self.spool_recovered = Counter(
            "spamtrap_spool_recovered", "Messages recovered from the spool at start", registry=r
        )
        # Filters
        self.filter_verdicts = Counter(
            "spamtrap_filter_verdicts",
            "Filter stage verdicts",
            ["stage", "verdict", "reason"],
            registry=r,
        )
        self.messages_processed = Counter(
            "spamtrap_messages_processed", "Messages through the filter pipeline", registry=r
        )
        self.processing_errors = Counter(
            "spamtrap_processing_errors",
            "Messages whose processing raised (kept, and logged)",
            registry=r,
        )
        # Bundles
        self.set_messages = Counter(
            "spamtrap_set_messages", "Messages written to a set", ["set"], registry=r
        )
        self.set_duplicates = Counter(
            "spamtrap_set_duplicates",
            "Exact copies left out of a set by its dedup window",
            ["set"],
            registry=r,
        )
        # Campaigns (spamtrap/work/campaign.py)
        self.campaigns_new = Counter(
            "spamtrap_campaigns_new",
            "Campaigns started: messages that matched no campaign remembered",
            registry=r,
        )
        self.campaigns_tracked = Gauge(
            "spamtrap_campaigns_tracked",
            "Campaigns remembered now (bounded by campaigns.max_campaigns)",
            registry=r,
        )
        self.campaign_sampled_out = Counter(
            "spamtrap_campaign_sampled_out",
            "Messages left out of a bundle that held per_campaign_cap of their campaign",
            ["set"],
            registry=r,
        )
        self.bundles = Counter(
            "spamtrap_bundles", "Bundles finalised and stored", ["set"], registry=r
        )
        self.bundle_bytes = Counter(
            "spamtrap_bundle_bytes", "Compressed bytes stored", ["set"], registry=r
        )
        self.store_errors = Counter(
            "spamtrap_store_errors", "Failed attempts to store a bundle", ["set"], registry=r
        )
        # Local store retention (store.retention)
        self.retention_deleted = Counter(
            "spamtrap_retention_deleted",
            "Bundles (with index and manifest) deleted from the local store by"
            " store.retention: older than max_age (age) or to stay under max_bytes (bytes)",
            ["reason"],
            registry=r,
        )
        self.retention_deleted_bytes = Counter(
            "spamtrap_retention_deleted_bytes",
            "Bytes deleted from the local store by store.retention",
            ["reason"],
            registry=r,
        )
        self.store_bytes = Gauge(
            "spamtrap_store_bytes",
            "Disk use of the local store (bundles, indexes, manifests) with retention on",
            registry=r,
        )
        self.bundles_open = Gauge(
            "spamtrap_bundles_open", "Bundles open for writing", ["set"], registry=r
        )

        self.bundles_skipped = Counter(
            "spamtrap_bundles_skipped",
            "Finished bundles dropped without storing: all the set's uploads were running"
            " (busy), its upload queue was full (queue-full), or its outage backlog was full"
            " (backlog-full)",
            ["set", "reason"],
            registry=r,
        )
        self.bundles_waiting = Gauge(
            "spamtrap_bundles_waiting",
            "Finished bundles not stored yet (uploading, retrying or waiting)",
            ["set"],
            registry=r,
        )
        self.bundles_state = Gauge(
            "spamtrap_bundles_state",
            "Bundles by lifecycle state (open|sealing|ready|uploading|retry_wait); the final"
            " states are counted by spamtrap_bundles, _skipped and _dropped",
            ["set", "state"],
            registry=r,
        )
        self.bundles_dropped = Counter(
            "spamtrap_bundles_dropped",
            "Bundles given up without acknowledging their messages, which the spool replays:"
            " a write error (write-error), a seal error (seal-error) or a cancelled stop"
            " (abandoned)",
            ["set", "reason"],
            registry=r,
        )
        # Notifications
        self.notifications = Counter(
            "spamtrap_notifications",
            "Notices of stored bundles to subscribers, by channel (mail|webhook) "
            "and outcome (sent|retry|failed)",
            ["channel", "outcome"],
            registry=r,
        )
        self.node_info = Gauge(
            "spamtrap_node_info",
            "Always 1: the node's name, role (all|listener|worker) and queue (redis|none)",
            ["node", "role", "queue"],
            registry=r,
        )
        # The Redis Streams work queue (scaled out)
        self.queue_up = Gauge(
            "spamtrap_queue_up", "1 while Redis answers, 0 while it is unreachable", registry=r
        )
        self.queue_added = Counter(
            "spamtrap_queue_added",
            "Messages added to the Redis stream (XADD acknowledged)",
            registry=r,
        )
        self.queue_unreachable = Counter(
            "spamtrap_queue_unreachable",
            "Messages that could not be added because Redis was unreachable, by what was"
            " done instead: spooled (kept in the local spool) or tempfail (answered 451)",
            ["action"],
            registry=r,
        )
        self.queue_forwarded = Counter(
            "spamtrap_queue_forwarded",
            "Messages moved from the local spool into the Redis stream after an outage",
            registry=r,
        )
        self.queue_shed = Counter(
            "spamtrap_queue_shed",
            "Oldest unprocessed messages trimmed from the stream by this node (MAXLEN ~)",
            registry=r,
        )
        self.queue_shed_cluster = Gauge(
            "spamtrap_queue_shed_cluster",
            "Messages trimmed from the stream by every node together (a Redis counter)",
            registry=r,
        )
        self.queue_read = Counter(
            "spamtrap_queue_read",
            "Messages read from the stream by this worker: new, own (its pending entries"
            " after a restart) or claimed (taken over from a worker that stopped answering)",
            ["how"],
            registry=r,
        )
        self.queue_acked = Counter(
            "spamtrap_queue_acked", "Messages acknowledged and deleted from the stream", registry=r
        )
        self.queue_held = Gauge(
            "spamtrap_queue_held",
            "Messages this worker has read and not acknowledged (in filters or open bundles)",
            registry=r,
        )
        self.queue_length = Gauge(
            "spamtrap_queue_length", "Messages in the stream (unread and pending)", registry=r
        )
        self.queue_pending = Gauge(
            "spamtrap_queue_pending",
            "Messages read by some worker and not yet acknowledged (the group's PEL)",
            registry=r,
        )
        self.queue_errors = Counter(
            "spamtrap_queue_errors", "Failed Redis calls, by operation", ["op"], registry=r
        )

        # Per-message outputs (spamtrap/outputs/, docs/outputs.md)
        self.output_sent = Counter(
            "spamtrap_output_sent", "Messages an output delivered", ["output"], registry=r
        )
        self.output_failed = Counter(
            "spamtrap_output_failed",
            "Failed sends, temporary (retried) and permanent (dropped), by reason",
            ["output", "reason"],
            registry=r,
        )
        self.output_dropped = Counter(
            "spamtrap_output_dropped",
            "Messages an output gave up on after a permanent failure",
            ["output"],
            registry=r,
        )
        self.output_shed = Counter(
            "spamtrap_output_shed",
            "Oldest queued messages dropped unsent: the output's queue was full or too old",
            ["output"],
            registry=r,
        )
        self.output_queue_depth = Gauge(
            "spamtrap_output_queue_depth",
            "Messages in an output's queue, waiting or being sent",
            ["output"],
            registry=r,
        )
        self.output_oldest_age = Gauge(
            "spamtrap_output_oldest_age_seconds",
            "Seconds the oldest message in an output's queue has waited (0: empty)",
            ["output"],
            registry=r,
        )
        self.output_queue_commits = Counter(
            "spamtrap_output_queue_commits",
            "Group commits (fsyncs) of an output's queue",
            ["output"],
            registry=r,
        )
        self.output_queue_recovered = Counter(
            "spamtrap_output_queue_recovered",
            "Messages found in an output's queue at start",
            ["output"],
            registry=r,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
