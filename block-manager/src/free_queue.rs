//! The queue of free blocks: an intrusive doubly linked list over block ids.
//!
//! Allocation pops from the head; freed blocks go to the tail, so a freed block that still
//! holds a cached prefix stays reusable for as long as possible and the least recently freed
//! one is evicted first (LRU). A cached block that a new request reuses is unlinked from the
//! middle in O(1), which is why this is a linked list and not a `VecDeque`.

use crate::BlockId;

const NIL: u32 = u32::MAX;

#[derive(Debug, Clone)]
pub(crate) struct FreeQueue {
    prev: Vec<u32>,
    next: Vec<u32>,
    linked: Vec<bool>,
    head: u32,
    tail: u32,
    len: usize,
}

impl FreeQueue {
    /// A queue holding `ids` in the given order, over a universe of `capacity` block ids.
    pub(crate) fn new(capacity: usize, ids: impl IntoIterator<Item = BlockId>) -> Self {
        let mut q = FreeQueue {
            prev: vec![NIL; capacity],
            next: vec![NIL; capacity],
            linked: vec![false; capacity],
            head: NIL,
            tail: NIL,
            len: 0,
        };
        for id in ids {
            q.push_back(id);
        }
        q
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn contains(&self, id: BlockId) -> bool {
        self.linked[id as usize]
    }

    pub(crate) fn push_back(&mut self, id: BlockId) {
        let i = id as usize;
        debug_assert!(!self.linked[i], "block {id} is already free");
        self.prev[i] = self.tail;
        self.next[i] = NIL;
        if self.tail == NIL {
            self.head = id;
        } else {
            self.next[self.tail as usize] = id;
        }
        self.tail = id;
        self.linked[i] = true;
        self.len += 1;
    }

    pub(crate) fn pop_front(&mut self) -> Option<BlockId> {
        if self.head == NIL {
            return None;
        }
        let id = self.head;
        self.remove(id);
        Some(id)
    }

    /// Unlinks `id`, which must be in the queue.
    pub(crate) fn remove(&mut self, id: BlockId) {
        let i = id as usize;
        debug_assert!(self.linked[i], "block {id} is not free");
        let (p, n) = (self.prev[i], self.next[i]);
        if p == NIL {
            self.head = n;
        } else {
            self.next[p as usize] = n;
        }
        if n == NIL {
            self.tail = p;
        } else {
            self.prev[n as usize] = p;
        }
        self.prev[i] = NIL;
        self.next[i] = NIL;
        self.linked[i] = false;
        self.len -= 1;
    }

    /// Ids from head to tail (for audits and tests).
    pub(crate) fn iter(&self) -> impl Iterator<Item = BlockId> + '_ {
        let mut cur = self.head;
        std::iter::from_fn(move || {
            if cur == NIL {
                return None;
            }
            let id = cur;
            cur = self.next[id as usize];
            Some(id)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fifo_order_and_middle_removal() {
        let mut q = FreeQueue::new(6, [1, 2, 3, 4, 5]);
        q.remove(3);
        assert_eq!(q.iter().collect::<Vec<_>>(), vec![1, 2, 4, 5]);
        assert_eq!(q.pop_front(), Some(1));
        q.push_back(3);
        q.remove(5);
        assert_eq!(q.iter().collect::<Vec<_>>(), vec![2, 4, 3]);
        assert_eq!(q.len(), 3);
        assert!(!q.contains(1) && q.contains(4));
        assert_eq!(q.pop_front(), Some(2));
        assert_eq!(q.pop_front(), Some(4));
        assert_eq!(q.pop_front(), Some(3));
        assert_eq!(q.pop_front(), None);
    }
}
