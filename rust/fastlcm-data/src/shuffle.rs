//! Seeded shuffle buffer of still-compressed samples.
//!
//! Every pushed item goes in; once more than `capacity` are held, a uniformly drawn one comes out. At the end
//! of an epoch `drain` empties it in random order. Capacity 0 passes items straight through (stream order).

use crate::rng::Rng;

pub struct ShuffleBuffer<T> {
    items: Vec<T>,
    capacity: usize,
    rng: Rng,
}

impl<T> ShuffleBuffer<T> {
    pub fn new(capacity: usize, rng: Rng) -> Self {
        ShuffleBuffer {
            items: Vec::with_capacity(capacity.min(1 << 16) + 1),
            capacity,
            rng,
        }
    }

    pub fn push(&mut self, item: T) -> Option<T> {
        if self.capacity == 0 {
            return Some(item);
        }
        self.items.push(item);
        if self.items.len() > self.capacity {
            let i = self.rng.below(self.items.len() as u64) as usize;
            return Some(self.items.swap_remove(i));
        }
        None
    }

    /// The items held, in buffer order.
    pub fn items(&self) -> &[T] {
        &self.items
    }

    /// Same buffer (order and RNG state) with every item mapped.
    pub fn map<U>(self, f: impl FnMut(T) -> U) -> ShuffleBuffer<U> {
        ShuffleBuffer {
            items: self.items.into_iter().map(f).collect(),
            capacity: self.capacity,
            rng: self.rng,
        }
    }

    /// Next item of the end-of-epoch drain, or None when empty.
    pub fn pop(&mut self) -> Option<T> {
        if self.items.is_empty() {
            return None;
        }
        let i = self.rng.below(self.items.len() as u64) as usize;
        Some(self.items.swap_remove(i))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(cap: usize, seed: u64) -> Vec<u32> {
        let mut b = ShuffleBuffer::new(cap, Rng::new(seed));
        let mut out: Vec<u32> = (0..50).filter_map(|i| b.push(i)).collect();
        while let Some(x) = b.pop() {
            out.push(x);
        }
        out
    }

    #[test]
    fn permutation_seeded_and_passthrough() {
        let a = run(10, 1);
        let mut sorted = a.clone();
        sorted.sort();
        assert_eq!(sorted, (0..50).collect::<Vec<_>>());
        assert_eq!(a, run(10, 1));
        assert_ne!(a, run(10, 2));
        assert_ne!(a, (0..50).collect::<Vec<_>>());
        assert_eq!(run(0, 1), (0..50).collect::<Vec<_>>());
    }
}
