//! The hub's counters and their Prometheus text, appended to the reactor's /metrics (SPEC §9).
//!
//! Owns: `HubMetrics` (plain integers bumped on the hot path) and its rendering.
//! Does not: derive gauges (rooms, members, ids online, retained messages): the hub passes
//! those in at render time, as the reactor does for connection states.

use crate::engine::streams::{Expiring, Removed};
use crate::server::metrics::Writer;
use crate::wire::AckStatus;
use std::collections::BTreeMap;

#[derive(Debug, Default)]
pub struct HubMetrics {
    /// Messages received on raw rooms (`/r/<room>`), and copies queued for their members.
    pub raw_messages: u64,
    pub raw_deliveries: u64,
    /// `send` envelopes accepted (duplicates excluded), and copies queued for connections.
    pub direct_messages: u64,
    pub direct_deliveries: u64,
    /// `publish` envelopes accepted, and copies queued for room members.
    pub publish_messages: u64,
    pub publish_deliveries: u64,
    /// Presence events queued for room members.
    pub presence_deliveries: u64,
    /// Direct messages that reached no connection and were queued offline.
    pub offline_queued: u64,
    /// Queued messages delivered when their id connected.
    pub offline_delivered: u64,
    /// Direct messages refused because the recipient's offline queue was full of pending ones.
    pub offline_refused_full: u64,
    /// Retained messages sent again to a connection that asked with `?since=`.
    pub recovery_replayed: u64,
    /// Connections with `?since=` whose welcome said `recovered: false`.
    pub recoveries_incomplete: u64,
    /// Connections with `?since=` whose welcome said `recovered: true`.
    pub recoveries_complete: u64,
    /// Room joins with `since` answered `recovered: true` / `false` (SPEC §16).
    pub room_recoveries_complete: u64,
    pub room_recoveries_incomplete: u64,
    /// Room history messages replayed to joiners with `since`.
    pub room_replayed: u64,
    /// `history` requests answered, and the messages their replies held.
    pub history_requests: u64,
    pub history_messages: u64,
    /// Sends and publishes rejected because the engine could not store them.
    pub store_rejections: u64,
    /// Sends and publishes rejected because too much was waiting for the engine already.
    pub store_busy: u64,
    /// Sends and publishes whose client id was seen before: acked again, not delivered.
    pub duplicates: u64,
    /// Acks by status.
    pub acks: BTreeMap<&'static str, u64>,
    /// `error` messages by code.
    pub errors: BTreeMap<&'static str, u64>,
    /// Connections closed (1008) for exceeding `--rate`/`--burst`.
    pub rate_limited: u64,
    /// Upgrades refused with 401, by reason.
    pub auth_failures: BTreeMap<&'static str, u64>,
    /// Upgrades refused with 403 for their Origin.
    pub origin_rejections: u64,
    /// `refresh` commands whose token replaced the connection's.
    pub token_refreshes_ok: u64,
    /// `refresh` commands refused, by reason (an `AuthError` label, `token_sub_mismatch`,
    /// `tokens_not_in_use`).
    pub token_refresh_refusals: BTreeMap<&'static str, u64>,
    /// Connections closed (4001) because their token expired without a refresh.
    pub token_expiries: u64,
    /// Publishes refused by the token's `publish` claim (envelope: acked `rejected`; raw room:
    /// closed 1008).
    pub token_publish_refusals: u64,
    /// Joins and leaves made on other nodes that the engine reported (SPEC §15), and those
    /// whose `info` was not JSON (shown as `null`).
    pub presence_remote_changes: u64,
    pub presence_remote_bad_info: u64,
}

/// Values derived from the hub's state at render time.
pub struct HubGauges {
    pub raw_rooms: usize,
    pub raw_members: usize,
    pub rooms: usize,
    pub room_members: usize,
    pub ids_online: usize,
    pub retained_messages: usize,
    pub retained_bytes: usize,
    pub offline_pending: usize,
    /// What the bounds removed so far, and what has expired but is not yet swept.
    pub removed: Removed,
    pub expiring: Expiring,
    /// Client ids remembered for duplicate suppression, the bytes counted for them against
    /// --dedup-max-bytes, and how many that bound made the relay forget early.
    pub dedup_records: usize,
    pub dedup_bytes: usize,
    pub dedup_evicted: u64,
    /// Bytes of messages submitted to the engine and not completed yet.
    pub in_flight_bytes: usize,
    /// Open connections admitted with a token (their expiry is tracked).
    pub token_connections: usize,
}

impl HubMetrics {
    pub fn bump(map: &mut BTreeMap<&'static str, u64>, key: &'static str) {
        *map.entry(key).or_insert(0) += 1;
    }

    /// Appends every hub metric in the Prometheus text format.
    pub fn render(&self, g: &HubGauges, out: &mut String) {
        let mut w = Writer::new(out);
        let (rm, ex) = (&g.removed, &g.expiring);

        w.family(
            "wsrelay_rooms",
            "gauge",
            "Rooms with at least one member, by kind.",
        );
        w.sample("wsrelay_rooms", &[("kind", "raw")], g.raw_rooms as u64);
        w.sample("wsrelay_rooms", &[("kind", "envelope")], g.rooms as u64);
        w.family(
            "wsrelay_room_members",
            "gauge",
            "Room memberships (a connection in two rooms counts twice), by kind.",
        );
        w.sample(
            "wsrelay_room_members",
            &[("kind", "raw")],
            g.raw_members as u64,
        );
        w.sample(
            "wsrelay_room_members",
            &[("kind", "envelope")],
            g.room_members as u64,
        );
        w.gauge(
            "wsrelay_ids_online",
            "Ids with at least one /ws connection.",
            g.ids_online,
        );

        w.counter(
            "wsrelay_raw_messages_total",
            "Messages received on raw rooms.",
            self.raw_messages,
        );
        w.counter(
            "wsrelay_raw_deliveries_total",
            "Raw room messages queued for members.",
            self.raw_deliveries,
        );
        w.counter(
            "wsrelay_direct_messages_total",
            "Direct messages (send) accepted.",
            self.direct_messages,
        );
        w.counter(
            "wsrelay_direct_deliveries_total",
            "Direct messages queued live on a recipient connection.",
            self.direct_deliveries,
        );
        w.counter(
            "wsrelay_publish_messages_total",
            "Room messages (publish) accepted.",
            self.publish_messages,
        );
        w.counter(
            "wsrelay_publish_deliveries_total",
            "Room messages queued for members.",
            self.publish_deliveries,
        );
        w.counter(
            "wsrelay_presence_deliveries_total",
            "Presence events queued for room members.",
            self.presence_deliveries,
        );
        w.counter(
            "wsrelay_presence_remote_changes_total",
            "Joins and leaves made on other nodes, reported by the engine (SPEC §15).",
            self.presence_remote_changes,
        );
        w.counter(
            "wsrelay_presence_remote_bad_info_total",
            "Presence from other nodes whose info was not JSON (shown as null).",
            self.presence_remote_bad_info,
        );

        w.counter(
            "wsrelay_offline_queued_total",
            "Direct messages queued for an id with no connection.",
            self.offline_queued,
        );
        w.counter(
            "wsrelay_offline_delivered_total",
            "Queued messages delivered when their id connected.",
            self.offline_delivered,
        );
        w.counter(
            "wsrelay_offline_expired_total",
            "Queued messages that reached --offline-ttl undelivered.",
            rm.expired_pending + ex.pending,
        );
        w.family(
            "wsrelay_offline_dropped_total",
            "counter",
            "Direct messages lost to the bounds: refused by a full per-id queue, or queued and evicted by --offline-max-bytes.",
        );
        w.sample(
            "wsrelay_offline_dropped_total",
            &[("reason", "queue_full")],
            self.offline_refused_full,
        );
        w.sample(
            "wsrelay_offline_dropped_total",
            &[("reason", "global_bytes")],
            rm.dropped_global,
        );
        w.gauge(
            "wsrelay_offline_pending",
            "Queued messages not yet delivered.",
            g.offline_pending.saturating_sub(ex.pending as usize),
        );
        w.gauge(
            "wsrelay_retained_messages",
            "Direct messages retained (queued or kept for recovery).",
            g.retained_messages.saturating_sub(ex.messages),
        );
        w.gauge(
            "wsrelay_retained_bytes",
            "Bytes retained, as counted against --offline-max-bytes.",
            g.retained_bytes.saturating_sub(ex.bytes),
        );
        w.family(
            "wsrelay_retained_evicted_total",
            "counter",
            "Delivered messages removed from the recovery log, by reason.",
        );
        let ttl = rm.expired_delivered + (ex.messages as u64).saturating_sub(ex.pending);
        w.sample("wsrelay_retained_evicted_total", &[("reason", "ttl")], ttl);
        w.sample(
            "wsrelay_retained_evicted_total",
            &[("reason", "per_id")],
            rm.evicted_per_stream,
        );
        w.sample(
            "wsrelay_retained_evicted_total",
            &[("reason", "global_bytes")],
            rm.evicted_global,
        );
        w.counter(
            "wsrelay_recovery_replayed_total",
            "Retained messages sent again to a connection that asked with ?since=.",
            self.recovery_replayed,
        );
        w.counter(
            "wsrelay_recoveries_incomplete_total",
            "Connections with ?since= told recovered: false (messages after since may be missing).",
            self.recoveries_incomplete,
        );
        w.family(
            "wsrelay_recoveries_total",
            "counter",
            "Recoveries asked for with a since, by kind (inbox: ?since= on connect; room: join with since) and by whether they were complete (SPEC §13).",
        );
        for (kind, recovered, n) in [
            ("inbox", "true", self.recoveries_complete),
            ("inbox", "false", self.recoveries_incomplete),
            ("room", "true", self.room_recoveries_complete),
            ("room", "false", self.room_recoveries_incomplete),
        ] {
            w.sample(
                "wsrelay_recoveries_total",
                &[("kind", kind), ("recovered", recovered)],
                n,
            );
        }
        w.counter(
            "wsrelay_room_replayed_total",
            "Room history messages replayed to connections that joined with since.",
            self.room_replayed,
        );
        w.counter(
            "wsrelay_history_requests_total",
            "history requests answered.",
            self.history_requests,
        );
        w.counter(
            "wsrelay_history_messages_total",
            "Messages sent in history replies.",
            self.history_messages,
        );
        w.counter(
            "wsrelay_store_rejections_total",
            "Sends and publishes acked rejected because the engine could not store them.",
            self.store_rejections,
        );
        w.counter(
            "wsrelay_store_busy_total",
            "Sends and publishes acked rejected because --max-in-flight-bytes of messages were already waiting for the engine.",
            self.store_busy,
        );
        w.gauge(
            "wsrelay_store_in_flight_bytes",
            "Bytes of messages waiting for the engine (the disk) now.",
            g.in_flight_bytes as u64,
        );
        w.counter(
            "wsrelay_duplicates_total",
            "Sends and publishes with an already seen client id (acked again, not delivered).",
            self.duplicates,
        );
        w.gauge(
            "wsrelay_dedup_records",
            "Client message ids remembered for duplicate suppression.",
            g.dedup_records,
        );
        w.gauge(
            "wsrelay_dedup_bytes",
            "Bytes the duplicate windows take, as counted against --dedup-max-bytes.",
            g.dedup_bytes,
        );
        w.counter(
            "wsrelay_dedup_evicted_total",
            "Client message ids forgotten before their time to stay within --dedup-max-bytes (a retry of one is delivered again).",
            g.dedup_evicted,
        );
        w.family("wsrelay_acks_total", "counter", "Acks sent, by status.");
        // Every status is printed, counted or not, so a scrape sees the whole family.
        for status in AckStatus::ALL.map(AckStatus::name) {
            let n = self.acks.get(status).copied().unwrap_or(0);
            w.sample("wsrelay_acks_total", &[("status", status)], n);
        }
        w.family(
            "wsrelay_envelope_errors_total",
            "counter",
            "Error messages sent, by code.",
        );
        for (code, n) in &self.errors {
            w.sample("wsrelay_envelope_errors_total", &[("code", code)], *n);
        }
        w.counter(
            "wsrelay_rate_limited_total",
            "Connections closed (1008) for exceeding --rate/--burst.",
            self.rate_limited,
        );
        w.family(
            "wsrelay_auth_failures_total",
            "counter",
            "Upgrades refused with 401, by reason.",
        );
        for (reason, n) in &self.auth_failures {
            w.sample("wsrelay_auth_failures_total", &[("reason", reason)], *n);
        }
        w.counter(
            "wsrelay_origin_rejections_total",
            "Upgrades refused with 403 for their Origin.",
            self.origin_rejections,
        );

        w.gauge(
            "wsrelay_token_connections",
            "Open connections admitted with a token (each is closed 4001 when its token expires).",
            g.token_connections,
        );
        w.family(
            "wsrelay_token_refreshes_total",
            "counter",
            "refresh commands, by result: ok (the new token replaced the old) or refused.",
        );
        let refused: u64 = self.token_refresh_refusals.values().sum();
        w.sample(
            "wsrelay_token_refreshes_total",
            &[("result", "ok")],
            self.token_refreshes_ok,
        );
        w.sample(
            "wsrelay_token_refreshes_total",
            &[("result", "refused")],
            refused,
        );
        w.family(
            "wsrelay_token_refresh_refusals_total",
            "counter",
            "refresh commands refused, by reason.",
        );
        for (reason, n) in &self.token_refresh_refusals {
            w.sample(
                "wsrelay_token_refresh_refusals_total",
                &[("reason", reason)],
                *n,
            );
        }
        w.counter(
            "wsrelay_token_expiries_total",
            "Connections closed with 4001 because their token expired without a refresh.",
            self.token_expiries,
        );
        w.counter(
            "wsrelay_token_publish_refusals_total",
            "Publishes refused by the token's publish claim (acked rejected; on a raw room, closed 1008).",
            self.token_publish_refusals,
        );
    }
}
