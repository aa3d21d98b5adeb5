//! `--dns-log`: one record per transaction (a query and its response), Zeek dns.log
//! field names. A query without a response is written once it is older than
//! [`UNANSWERED_AFTER`], without `rcode`. A response that answers no query the agent saw
//! (same client, server, ports, protocol, id and question, in time) is unsolicited: it is
//! written on its own, marked so, and teaches nothing.

use std::{borrow::Cow, net::IpAddr, num::NonZeroUsize, time::Duration};

use lru::LruCache;
use serde::Serialize;

use super::parse::{AnswerData, Message, Meta, display_name, rcode_name, type_name};
use crate::proto;

pub const UNANSWERED_AFTER: Duration = Duration::from_secs(30);
/// Queries waiting for their response at most; the oldest is written unanswered. Each
/// keeps its question only (at most 255 bytes of name), never what else the message
/// carried: about 26 MB when full.
pub const PENDING_MAX: usize = 65_536;

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct DnsRecord {
    /// The query (or the response where no query was seen), epoch seconds.
    pub ts: f64,
    /// The uid of the connection record that carried it, where known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,
    #[serde(rename = "id.orig_h")]
    pub orig_h: IpAddr,
    #[serde(rename = "id.orig_p")]
    pub orig_p: u16,
    #[serde(rename = "id.resp_h")]
    pub resp_h: IpAddr,
    #[serde(rename = "id.resp_p")]
    pub resp_p: u16,
    pub proto: Cow<'static, str>,
    pub trans_id: u16,
    /// Seconds from query to response.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rtt: Option<f64>,
    pub query: String,
    pub qtype: u16,
    pub qtype_name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rcode: Option<u8>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rcode_name: Option<String>,
    pub answers: Vec<String>,
    #[serde(rename = "TTLs")]
    pub ttls: Vec<f64>,
    /// A response to no query the agent saw.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub unsolicited: bool,
}

/// The transaction a message belongs to: client, server, protocol, id.
type TxKey = (IpAddr, u16, IpAddr, u16, u8, u16);

struct Query {
    ts_ns: u64,
    meta: Meta,
    msg: Message,
}

/// Pairs queries with responses into records. Times are on the kernel clock; `epoch`
/// converts them.
pub struct Transactions {
    pending: LruCache<TxKey, Query>,
}

impl Default for Transactions {
    fn default() -> Self {
        Self {
            pending: LruCache::new(NonZeroUsize::new(PENDING_MAX).expect("non-zero")),
        }
    }
}

fn key(meta: &Meta, msg: &Message) -> TxKey {
    let ((c, cp), (s, sp)) = meta.client_server(msg.response);
    (c, cp, s, sp, meta.proto, msg.id)
}

impl Transactions {
    /// Takes a query; returns the record of the one it pushed out, if any.
    pub fn query(
        &mut self,
        meta: Meta,
        msg: &Message,
        epoch: impl Fn(u64) -> f64,
    ) -> Option<DnsRecord> {
        let question = Message {
            answers: Vec::new(),
            ..msg.clone()
        };
        let (_, old) = self.pending.push(
            key(&meta, msg),
            Query {
                ts_ns: meta.ts_ns,
                meta,
                msg: question,
            },
        )?;
        // Evicted for room, or the same id asked again: written unanswered.
        Some(record(old.meta, &old.msg, None, &epoch))
    }

    /// Takes a response: its record, and whether it answers a query seen waiting for it.
    /// A response that matches a waiting query's id but not its question leaves the query
    /// waiting for the real answer.
    pub fn answer(
        &mut self,
        meta: Meta,
        msg: &Message,
        epoch: impl Fn(u64) -> f64,
    ) -> (DnsRecord, bool) {
        let key = key(&meta, msg);
        let answers = self.pending.peek(&key).is_some_and(|q| {
            q.msg.qname == msg.qname
                && q.msg.qtype == msg.qtype
                && meta.ts_ns.saturating_sub(q.ts_ns) < UNANSWERED_AFTER.as_nanos() as u64
        });
        let mut rec = record(meta, msg, Some(msg), &epoch);
        if answers {
            let query = self.pending.pop(&key).expect("peeked");
            rec.ts = epoch(query.ts_ns);
            rec.rtt = Some(meta.ts_ns.saturating_sub(query.ts_ns) as f64 / 1e9);
        } else {
            rec.unsolicited = true;
        }
        (rec, answers)
    }

    /// Queries unanswered for [`UNANSWERED_AFTER`] at `now_ns`.
    pub fn expire(&mut self, now_ns: u64, epoch: impl Fn(u64) -> f64) -> Vec<DnsRecord> {
        let limit = UNANSWERED_AFTER.as_nanos() as u64;
        let mut done = Vec::new();
        while let Some((_, q)) = self.pending.peek_lru() {
            if now_ns.saturating_sub(q.ts_ns) < limit {
                break;
            }
            let (_, q) = self.pending.pop_lru().expect("peeked");
            done.push(record(q.meta, &q.msg, None, &epoch));
        }
        done
    }

    /// Everything still waiting, at shutdown.
    pub fn drain(&mut self, epoch: impl Fn(u64) -> f64) -> Vec<DnsRecord> {
        let mut done = Vec::new();
        while let Some((_, q)) = self.pending.pop_lru() {
            done.push(record(q.meta, &q.msg, None, &epoch));
        }
        done
    }
}

/// A record for `msg` (the query, or the response where none was seen), with the
/// response's outcome when there is one.
fn record(
    meta: Meta,
    msg: &Message,
    response: Option<&Message>,
    epoch: &impl Fn(u64) -> f64,
) -> DnsRecord {
    let ((orig_h, orig_p), (resp_h, resp_p)) = meta.client_server(msg.response);
    let (answers, ttls) = response
        .map(|r| {
            r.answers
                .iter()
                .map(|a| {
                    let text = match &a.data {
                        AnswerData::Addr(addr) => addr.to_string(),
                        AnswerData::Cname(name) => display_name(name),
                        AnswerData::Other(kind) => format!("<{kind}>"),
                    };
                    (text, f64::from(a.ttl))
                })
                .unzip()
        })
        .unwrap_or_default();
    DnsRecord {
        ts: epoch(meta.ts_ns),
        uid: None,
        orig_h,
        orig_p,
        resp_h,
        resp_p,
        proto: proto::name(meta.proto),
        trans_id: msg.id,
        rtt: None,
        query: display_name(&msg.qname),
        qtype: msg.qtype,
        qtype_name: type_name(msg.qtype),
        rcode: response.map(|r| r.rcode),
        rcode_name: response.map(|r| rcode_name(r.rcode)),
        answers,
        ttls,
        unsolicited: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dns::parse::{parse_message, tests::message};

    const SEC: u64 = 1_000_000_000;

    fn meta(ts_ns: u64, response: bool) -> Meta {
        let (c, s): (IpAddr, IpAddr) = (
            "198.18.0.10".parse().unwrap(),
            "192.0.2.53".parse().unwrap(),
        );
        if response {
            Meta {
                ts_ns,
                src: s,
                dst: c,
                sport: 53,
                dport: 40000,
                proto: 17,
            }
        } else {
            Meta {
                ts_ns,
                src: c,
                dst: s,
                sport: 40000,
                dport: 53,
                proto: 17,
            }
        }
    }

    fn epoch(ns: u64) -> f64 {
        1e9 + ns as f64 / 1e9
    }

    #[test]
    fn a_query_and_its_response_make_one_record() {
        let mut t = Transactions::default();
        let q = parse_message(&message(7, false, 0, b"files.example.test", 1, &[])).unwrap();
        let r = parse_message(&message(
            7,
            true,
            0,
            b"files.example.test",
            1,
            &[(b"files.example.test", 300, 1, vec![203, 0, 113, 10])],
        ))
        .unwrap();
        assert!(t.query(meta(SEC, false), &q, epoch).is_none());
        let (rec, solicited) = t.answer(meta(SEC + SEC / 100, true), &r, epoch);
        assert!(solicited);
        let json = serde_json::to_value(&rec).unwrap();
        assert!(json.get("unsolicited").is_none());
        assert_eq!(json["ts"], 1e9 + 1.0);
        assert_eq!(json["id.orig_h"], "198.18.0.10");
        assert_eq!(json["id.resp_p"], 53);
        assert_eq!(json["proto"], "udp");
        assert_eq!(json["trans_id"], 7);
        assert_eq!(json["query"], "files.example.test");
        assert_eq!(json["qtype_name"], "A");
        assert_eq!(json["rcode_name"], "NOERROR");
        assert_eq!(json["answers"], serde_json::json!(["203.0.113.10"]));
        assert_eq!(json["TTLs"], serde_json::json!([300.0]));
        assert!((json["rtt"].as_f64().unwrap() - 0.01).abs() < 1e-9);
    }

    #[test]
    fn unanswered_queries_are_written_after_a_while() {
        let mut t = Transactions::default();
        let q = parse_message(&message(8, false, 0, b"gone.example.test", 28, &[])).unwrap();
        t.query(meta(0, false), &q, epoch);
        assert!(t.expire(29 * SEC, epoch).is_empty());
        let recs = t.expire(30 * SEC, epoch);
        assert_eq!(recs.len(), 1);
        let json = serde_json::to_value(&recs[0]).unwrap();
        assert_eq!(json["qtype_name"], "AAAA");
        assert!(json.get("rcode_name").is_none());
        assert!(t.drain(epoch).is_empty());
    }

    #[test]
    fn only_an_answer_to_the_question_asked_in_time_is_solicited() {
        let mut t = Transactions::default();
        let q = parse_message(&message(9, false, 0, b"cdn.allowed.test", 1, &[])).unwrap();
        let answer = |id, name: &[u8]| {
            parse_message(&message(
                id,
                true,
                0,
                name,
                1,
                &[(name, 60, 1, vec![192, 0, 2, 66])],
            ))
            .unwrap()
        };
        t.query(meta(0, false), &q, epoch);
        for (id, name, at) in [
            (10, b"cdn.allowed.test".as_slice(), SEC),
            (9, b"drop.site.test".as_slice(), SEC),
        ] {
            let (rec, solicited) = t.answer(meta(at, true), &answer(id, name), epoch);
            assert!(!solicited, "id {id} {name:?}");
            assert_eq!(serde_json::to_value(&rec).unwrap()["unsolicited"], true);
        }
        let (_, solicited) = t.answer(meta(2 * SEC, true), &answer(9, b"cdn.allowed.test"), epoch);
        assert!(solicited, "the query waited for its own answer");
        let (_, solicited) = t.answer(meta(3 * SEC, true), &answer(9, b"cdn.allowed.test"), epoch);
        assert!(!solicited, "a query is answered once");

        t.query(meta(0, false), &q, epoch);
        let (_, solicited) = t.answer(meta(31 * SEC, true), &answer(9, b"cdn.allowed.test"), epoch);
        assert!(!solicited, "too late");
    }
}
