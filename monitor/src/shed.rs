//! Bounds for state that anyone can grow one key at a time (a remote address, an alert
//! key, a host): a full table sheds its smaller half and counts what it shed.

/// The median of `values`: a full table keeps the entries above it. None when empty.
pub fn cut(values: impl Iterator<Item = u64>) -> Option<u64> {
    let mut values: Vec<u64> = values.collect();
    if values.is_empty() {
        return None;
    }
    let middle = values.len() / 2;
    Some(*values.select_nth_unstable(middle).1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cut_keeps_the_larger_half() {
        assert_eq!(cut([5, 1, 4, 2, 3].into_iter()), Some(3));
        assert_eq!(cut(std::iter::empty()), None);
    }
}
