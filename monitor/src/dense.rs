//! A map for items that carry their own key, held in one dense vector with a small
//! index beside it.
//!
//! A `HashMap<K, V>` keeps a slot of key and value for every bucket, and its buckets run
//! from 1.14 to 2.3 times its length: at a million connections that was most of the
//! agent's memory. Here the items sit back to back (a growing vector's untouched tail is
//! never resident) and each bucket holds only a `u32` position; the key is stored once,
//! inside the item.

use std::hash::{BuildHasher as _, Hash};

use hashbrown::HashTable;

/// An item that knows its own key.
pub trait Keyed {
    type Key: Hash + Eq;

    fn key(&self) -> &Self::Key;
}

pub struct DenseMap<T: Keyed> {
    items: Vec<T>,
    /// Positions in `items`, found by the hash of the item's key.
    index: HashTable<u32>,
    hasher: foldhash::fast::RandomState,
}

impl<T: Keyed> Default for DenseMap<T> {
    fn default() -> Self {
        Self {
            items: Vec::new(),
            index: HashTable::new(),
            hasher: foldhash::fast::RandomState::default(),
        }
    }
}

impl<T: Keyed + std::fmt::Debug> std::fmt::Debug for DenseMap<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(&self.items).finish()
    }
}

impl<T: Keyed> DenseMap<T> {
    fn hash(&self, key: &T::Key) -> u64 {
        self.hasher.hash_one(key)
    }

    /// Where the item of `key` sits: an index for [`Self::at`], valid until the next
    /// insert or removal.
    pub fn position(&self, key: &T::Key) -> Option<usize> {
        let items = &self.items;
        self.index
            .find(self.hash(key), |&i| items[i as usize].key() == key)
            .map(|&i| i as usize)
    }

    pub fn get(&self, key: &T::Key) -> Option<&T> {
        self.position(key).map(|i| &self.items[i])
    }

    pub fn get_mut(&mut self, key: &T::Key) -> Option<&mut T> {
        self.position(key).map(|i| &mut self.items[i])
    }

    pub fn at(&self, position: usize) -> Option<&T> {
        self.items.get(position)
    }

    pub fn at_mut(&mut self, position: usize) -> Option<&mut T> {
        self.items.get_mut(position)
    }

    /// Adds `item`, returning the one it replaces (same key), if any.
    pub fn insert(&mut self, item: T) -> Option<T> {
        if let Some(i) = self.position(item.key()) {
            return Some(std::mem::replace(&mut self.items[i], item));
        }
        self.push_new(item);
        None
    }

    /// Adds an item whose key is not in the map yet; returns its position (the last).
    pub fn push_new(&mut self, item: T) -> usize {
        debug_assert!(self.position(item.key()).is_none(), "a key already present");
        let position = self.items.len();
        let hash = self.hash(item.key());
        index_at(&mut self.index, &self.items, &self.hasher, hash, position);
        self.items.push(item);
        position
    }

    /// The item of `key`, made by `make` and added first if there is none.
    pub fn get_or_insert_with(&mut self, key: &T::Key, make: impl FnOnce() -> T) -> &mut T {
        let position = match self.position(key) {
            Some(position) => position,
            None => self.push_new(make()),
        };
        &mut self.items[position]
    }

    pub fn remove(&mut self, key: &T::Key) -> Option<T> {
        let position = self.position(key)?;
        Some(self.remove_at(position))
    }

    /// Removes the item at `position`; the last item takes its place.
    pub fn remove_at(&mut self, position: usize) -> T {
        let hash = self.hash(self.items[position].key());
        let wanted = position as u32;
        self.index
            .find_entry(hash, |&i| i == wanted)
            .expect("every item is indexed")
            .remove();
        let last = self.items.len() - 1;
        if position != last {
            let hash = self.hash(self.items[last].key());
            let moved = last as u32;
            *self
                .index
                .find_mut(hash, |&i| i == moved)
                .expect("every item is indexed") = wanted;
        }
        self.items.swap_remove(position)
    }

    /// Keeps the items for which `keep` is true.
    pub fn retain(&mut self, mut keep: impl FnMut(&mut T) -> bool) {
        let gone: Vec<usize> = (self.items.iter_mut().enumerate())
            .filter_map(|(i, item)| (!keep(item)).then_some(i))
            .collect();
        if gone.len() * 8 < self.items.len() {
            // Last first: the item that takes a removed one's place is always kept.
            for &position in gone.iter().rev() {
                self.remove_at(position);
            }
        } else if !gone.is_empty() {
            // Many gone: the rest close ranks and are indexed afresh, cheaper than a
            // lookup in the index for each item gone.
            let mut gone = gone.into_iter().peekable();
            let mut position = 0;
            self.items.retain(|_| {
                let kept = gone.next_if_eq(&position).is_none();
                position += 1;
                kept
            });
            self.reindex();
        }
    }

    fn reindex(&mut self) {
        self.index.clear();
        for (position, item) in self.items.iter().enumerate() {
            let hash = self.hasher.hash_one(item.key());
            index_at(&mut self.index, &self.items, &self.hasher, hash, position);
        }
    }

    pub fn iter(&self) -> std::slice::Iter<'_, T> {
        self.items.iter()
    }

    pub fn iter_mut(&mut self) -> std::slice::IterMut<'_, T> {
        self.items.iter_mut()
    }

    /// Every item, leaving the map empty.
    pub fn drain(&mut self) -> std::vec::Drain<'_, T> {
        self.index.clear();
        self.items.drain(..)
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }
}

/// Indexes `position` under `hash`; a growing index hashes again the keys of the `items`
/// its positions point to.
fn index_at<T: Keyed>(
    index: &mut HashTable<u32>,
    items: &[T],
    hasher: &foldhash::fast::RandomState,
    hash: u64,
    position: usize,
) {
    index.insert_unique(
        hash,
        u32::try_from(position).expect("fewer than 2^32 items"),
        |&i| hasher.hash_one(items[i as usize].key()),
    );
}

impl<T: Keyed> FromIterator<T> for DenseMap<T> {
    fn from_iter<I: IntoIterator<Item = T>>(items: I) -> Self {
        let mut map = Self::default();
        for item in items {
            map.insert(item);
        }
        map
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    #[derive(Debug, Clone, PartialEq)]
    struct Item(u32, u64);

    impl Keyed for Item {
        type Key = u32;

        fn key(&self) -> &u32 {
            &self.0
        }
    }

    /// A long random mix of inserts, replacements, updates, removals and retains agrees
    /// with a HashMap at every step.
    #[test]
    fn agrees_with_a_hash_map() {
        let mut dense = DenseMap::<Item>::default();
        let mut oracle = HashMap::<u32, u64>::new();
        let mut rng = 0x2545_f491_4f6c_dd1du64;
        let mut next = || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        for step in 0..200_000u64 {
            let key = (next() % 5_000) as u32;
            match next() % 10 {
                0..=4 => assert_eq!(
                    dense.insert(Item(key, step)).map(|i| i.1),
                    oracle.insert(key, step)
                ),
                5..=7 => assert_eq!(dense.remove(&key).map(|i| i.1), oracle.remove(&key)),
                8 => {
                    if let Some(item) = dense.get_mut(&key) {
                        item.1 += 1;
                    }
                    if let Some(v) = oracle.get_mut(&key) {
                        *v += 1;
                    }
                    dense.get_or_insert_with(&key, || Item(key, step)).1 += 1;
                    *oracle.entry(key).or_insert(step) += 1;
                }
                _ if step % 1_000 == 0 => {
                    // A third of them gone, or a few.
                    let every = if step % 2_000 == 0 { 3 } else { 50 };
                    let cut = next() % every;
                    dense.retain(|i| i.1 % every != cut);
                    oracle.retain(|_, v| *v % every != cut);
                }
                _ => {}
            }
            assert_eq!(dense.get(&key).map(|i| i.1), oracle.get(&key).copied());
            assert_eq!(dense.len(), oracle.len());
        }
        for (k, v) in &oracle {
            assert_eq!(dense.get(k), Some(&Item(*k, *v)));
        }
        let drained: HashMap<u32, u64> = dense.drain().map(|i| (i.0, i.1)).collect();
        assert_eq!(drained, oracle);
        assert!(dense.is_empty() && dense.get(&0).is_none());
    }
}
