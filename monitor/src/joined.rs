//! What the kernel hands over beside the flow map (TLS and QUIC hellos, socket owners),
//! joined to its connection by the connection's (pre-NAT) flow key. An item whose
//! connection the poll's read did not find yet (its packets came after the read) waits
//! one poll; the table's connections then carry theirs until they finish.

use foldhash::HashMap;
use monitor_common::flow::FlowKey;

/// Polls between two sweeps of the items whose connection left the table without
/// finishing (absorbed into its translated self, whose key the item did not know).
const SWEEP_EVERY: u32 = 256;

/// The items of the connections in the table.
#[derive(Debug)]
pub struct ByConn<V>(HashMap<FlowKey, V>);

impl<V> Default for ByConn<V> {
    fn default() -> Self {
        Self(HashMap::default())
    }
}

impl<V> ByConn<V> {
    pub fn get(&self, key: &FlowKey) -> Option<&V> {
        // Most connections have none: an empty map costs no hash.
        if self.0.is_empty() {
            return None;
        }
        self.0.get(key)
    }
}

#[derive(Debug)]
pub struct Joined<V> {
    joined: ByConn<V>,
    /// This poll's items, not yet matched to a connection.
    fresh: Vec<(FlowKey, V)>,
    /// Items whose connection the last poll's read did not find: matched at this poll,
    /// else dropped.
    waiting: Vec<(FlowKey, V)>,
    /// Settles since the last sweep (see [`SWEEP_EVERY`]).
    settles: u32,
}

impl<V> Default for Joined<V> {
    fn default() -> Self {
        Self {
            joined: ByConn::default(),
            fresh: Vec::new(),
            waiting: Vec::new(),
            settles: 0,
        }
    }
}

impl<V> Joined<V> {
    /// An item of this poll, for the connection of `key`.
    pub fn push(&mut self, key: FlowKey, item: V) {
        self.fresh.push((key, item));
    }

    /// After a poll's read of the map: this poll's items and those left waiting go to
    /// their connections where `known` finds them (a later item of a connection replaces
    /// its earlier one); this poll's others wait for the next.
    pub fn settle(&mut self, known: impl Fn(&FlowKey) -> bool) {
        for (key, item) in std::mem::take(&mut self.waiting) {
            if known(&key) {
                self.joined.0.insert(key, item);
            }
        }
        for (key, item) in self.fresh.drain(..) {
            if known(&key) {
                self.joined.0.insert(key, item);
            } else {
                self.waiting.push((key, item));
            }
        }
        self.settles += 1;
        if self.settles >= SWEEP_EVERY {
            self.settles = 0;
            self.joined.0.retain(|key, _| known(key));
        }
    }

    /// A finished connection's item goes with it.
    pub fn forget(&mut self, key: &FlowKey) {
        self.joined.0.remove(key);
    }

    pub fn joined(&self) -> &ByConn<V> {
        &self.joined
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(port: u16) -> FlowKey {
        FlowKey {
            port_a: port,
            ..FlowKey::default()
        }
    }

    #[test]
    fn an_item_joins_its_connection_when_the_table_knows_it() {
        let mut joined = Joined::default();
        joined.push(key(1), "hello");
        // Its connection's packets came after this poll's read: it waits one poll.
        joined.settle(|_| false);
        assert_eq!(joined.joined().get(&key(1)), None);
        joined.settle(|k| *k == key(1));
        assert_eq!(joined.joined().get(&key(1)), Some(&"hello"));
        joined.forget(&key(1));
        assert_eq!(joined.joined().get(&key(1)), None);
    }

    #[test]
    fn an_item_no_connection_claims_is_dropped_after_a_poll() {
        let mut joined = Joined::default();
        joined.push(key(1), "hello");
        joined.settle(|_| false);
        joined.settle(|_| false);
        joined.settle(|k| *k == key(1));
        assert_eq!(joined.joined().get(&key(1)), None);
    }

    #[test]
    fn a_sweep_drops_items_of_connections_gone_unfinished() {
        let mut joined = Joined::default();
        joined.push(key(1), "hello");
        joined.settle(|k| *k == key(1));
        for _ in 0..SWEEP_EVERY {
            joined.settle(|_| false);
        }
        assert_eq!(joined.joined().get(&key(1)), None);
    }
}
