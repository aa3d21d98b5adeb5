//! Connections found finished and not yet taken out of the map. A poll takes them for a
//! bounded time and leaves the rest to the next: a flood finishes tens of thousands in
//! one poll, and polls must keep their interval.

use std::collections::VecDeque;

use foldhash::HashSet;
use monitor_common::flow::FlowKey;

use crate::conntable::EndReason;

/// Why a queued connection ends: `None` when it ended by itself (closed or idle, as its
/// counts say when it is taken).
pub type Ending = Option<EndReason>;

#[derive(Debug, Default)]
pub struct Finishing {
    queue: VecDeque<(FlowKey, Ending)>,
    queued: HashSet<FlowKey>,
}

impl Finishing {
    /// Queues `key` unless it is queued already; returns whether it was added.
    pub fn push(&mut self, key: FlowKey, ending: Ending) -> bool {
        let added = self.queued.insert(key);
        if added {
            self.queue.push_back((key, ending));
        }
        added
    }

    /// Puts back, first in line, a connection whose taking failed.
    pub fn put_back(&mut self, key: FlowKey, ending: Ending) {
        if self.queued.insert(key) {
            self.queue.push_front((key, ending));
        }
    }

    /// The connection queued longest.
    pub fn pop(&mut self) -> Option<(FlowKey, Ending)> {
        let (key, ending) = self.queue.pop_front()?;
        self.queued.remove(&key);
        Some((key, ending))
    }

    pub fn len(&self) -> usize {
        self.queue.len()
    }

    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u16) -> FlowKey {
        FlowKey {
            port_a: n,
            ..FlowKey::default()
        }
    }

    #[test]
    fn each_key_once_in_the_order_found() {
        let mut finishing = Finishing::default();
        assert!(finishing.push(key(1), None));
        assert!(finishing.push(key(2), Some(EndReason::LackOfResources)));
        assert!(!finishing.push(key(1), Some(EndReason::LackOfResources)));
        assert_eq!(finishing.len(), 2);
        assert_eq!(finishing.pop(), Some((key(1), None)));
        finishing.put_back(key(1), None);
        assert_eq!(finishing.pop(), Some((key(1), None)));
        assert_eq!(
            finishing.pop(),
            Some((key(2), Some(EndReason::LackOfResources)))
        );
        assert!(finishing.is_empty());
        assert!(
            finishing.push(key(1), None),
            "a key taken can be queued again"
        );
    }
}
