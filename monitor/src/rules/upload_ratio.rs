//! UploadRatio: on a service that normally downloads (HTTP on 80/tcp by default), a local
//! client sent more than FACTOR times the payload it received. Evaluated once, when the
//! connection finishes.

use super::{ConnCtx, Now, Rule, human_bytes};
use crate::{
    alerts::{Alert, Note},
    rules::targets::Service,
};

pub struct UploadRatio {
    services: Vec<Service>,
    factor: f64,
    min_bytes: u64,
}

impl UploadRatio {
    pub fn new(services: Vec<Service>, factor: f64, min_bytes: u64) -> Self {
        Self {
            services,
            factor,
            min_bytes,
        }
    }
}

impl Rule for UploadRatio {
    fn on_finish(&mut self, conn: &ConnCtx, now: Now, out: &mut Vec<Alert>) {
        let service = conn.offered();
        if !(conn.local_orig && !conn.local_resp) || !self.services.contains(&service) {
            return;
        }
        let (sent, received) = (conn.conn.orig().bytes, conn.conn.resp().bytes);
        if sent < self.min_bytes || sent as f64 <= self.factor * received as f64 {
            return;
        }
        let ratio = if received == 0 {
            None
        } else {
            Some(sent as f64 / received as f64)
        };
        let msg = format!(
            "{} sent {} and received {} on {} port {}/{}, a service that normally downloads ({} than {} x)",
            conn.orig.addr,
            human_bytes(sent),
            human_bytes(received),
            conn.resp.addr,
            service.port,
            crate::proto::name(service.proto),
            ratio.map_or("infinitely more".to_owned(), |r| format!("{r:.1} x, more")),
            self.factor,
        );
        out.push(
            conn.alert(now, Note::UploadRatio, msg, conn.orig.addr, conn.resp.addr)
                .with("bytes", sent)
                .with("resp_bytes", received)
                .with("ratio", ratio)
                .with("factor", self.factor)
                .with("min_bytes", self.min_bytes),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::testkit::*;

    fn rule(min_bytes: u64) -> UploadRatio {
        UploadRatio::new(vec!["80/tcp".parse().unwrap()], 1.0, min_bytes)
    }

    fn http(orig_bytes: u64, resp_bytes: u64) -> ConnSpec {
        ConnSpec {
            resp: ("203.0.113.2", 80),
            orig_bytes,
            resp_bytes,
            ..ConnSpec::default()
        }
    }

    #[test]
    fn classic_rule_post_versus_get() {
        let mut r = rule(0);
        let post = http(5_000, 300);
        assert!(
            update(&mut r, &post.conn(), at(1.0)).is_empty(),
            "only when finished"
        );
        let alerts = finish(&mut r, &post.conn(), at(2.0));
        assert_eq!(alerts.len(), 1);
        assert_eq!(alerts[0].note, Note::UploadRatio);
        assert_eq!(alerts[0].figures["bytes"], 5_000);
        assert!(
            finish(&mut r, &http(300, 5_000).conn(), at(2.0)).is_empty(),
            "a GET"
        );
        assert!(
            finish(&mut r, &http(300, 300).conn(), at(2.0)).is_empty(),
            "equal is not more"
        );
    }

    #[test]
    fn minimum_bytes_port_and_direction() {
        let mut r = rule(1_000_000);
        assert!(finish(&mut r, &http(999_999, 0).conn(), at(1.0)).is_empty());
        assert_eq!(finish(&mut r, &http(1_000_000, 0).conn(), at(1.0)).len(), 1);
        let https = ConnSpec {
            resp: ("203.0.113.2", 443),
            orig_bytes: 5_000_000,
            ..ConnSpec::default()
        };
        assert!(
            finish(&mut r, &https.conn(), at(1.0)).is_empty(),
            "not a listed port"
        );
        let inbound = ConnSpec {
            orig: ("203.0.113.2", 50000),
            resp: ("198.18.1.2", 80),
            orig_bytes: 5_000_000,
            ..ConnSpec::default()
        };
        assert!(
            finish(&mut r, &inbound.conn(), at(1.0)).is_empty(),
            "a remote client"
        );
    }
}
