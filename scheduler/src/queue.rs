//! The waiting queue: FCFS or priority behind one interface.

use std::collections::{BTreeSet, VecDeque};

/// Index of a request in the scheduler's slab.
pub(crate) type Slot = u32;

#[derive(Debug, Clone)]
pub(crate) enum WaitingQueue {
    Fcfs(VecDeque<Slot>),
    /// Ordered by (priority, arrival); a preempted request keeps its key, so it returns to
    /// where its priority puts it, as in vLLM.
    Priority(BTreeSet<(i32, u64, Slot)>),
}

impl WaitingQueue {
    pub fn len(&self) -> usize {
        match self {
            WaitingQueue::Fcfs(q) => q.len(),
            WaitingQueue::Priority(q) => q.len(),
        }
    }
    pub fn peek(&self) -> Option<Slot> {
        match self {
            WaitingQueue::Fcfs(q) => q.front().copied(),
            WaitingQueue::Priority(q) => q.first().map(|k| k.2),
        }
    }
    pub fn pop(&mut self) -> Option<Slot> {
        match self {
            WaitingQueue::Fcfs(q) => q.pop_front(),
            WaitingQueue::Priority(q) => q.pop_first().map(|k| k.2),
        }
    }
    pub fn push_back(&mut self, slot: Slot, priority: i32, arrival: u64) {
        match self {
            WaitingQueue::Fcfs(q) => q.push_back(slot),
            WaitingQueue::Priority(q) => {
                q.insert((priority, arrival, slot));
            }
        }
    }
    /// Where a preempted request goes: the front (FCFS) or its priority place.
    pub fn push_front(&mut self, slot: Slot, priority: i32, arrival: u64) {
        match self {
            WaitingQueue::Fcfs(q) => q.push_front(slot),
            WaitingQueue::Priority(q) => {
                q.insert((priority, arrival, slot));
            }
        }
    }
    pub fn remove(&mut self, slot: Slot, priority: i32, arrival: u64) -> bool {
        match self {
            WaitingQueue::Fcfs(q) => match q.iter().position(|&s| s == slot) {
                Some(i) => {
                    q.remove(i);
                    true
                }
                None => false,
            },
            WaitingQueue::Priority(q) => q.remove(&(priority, arrival, slot)),
        }
    }
}
