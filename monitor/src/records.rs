//! The conn log as a consumer of polls: one record per finished connection, translated
//! and named as its last poll knows it.

use crate::{
    clock::Now,
    conntable::EndReason,
    consumer::{ConnCtx, Consumer},
    logs::JsonLines,
};

pub struct ConnRecords {
    pub log: JsonLines,
}

impl Consumer for ConnRecords {
    fn finish(&mut self, conn: &ConnCtx, now: Now, _reason: EndReason) {
        self.log.write(&conn.record(now));
    }
}
