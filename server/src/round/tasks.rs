//! The tasks of a phase (a round's fit tasks, an evaluation's, the paired tests' placements): who owns each,
//! which are still pending, and the phase's deadline. One set serves every phase.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Instant;

use fedslm_protocol::CenterId;

use super::TaskId;

#[derive(Debug)]
pub(crate) struct TaskSet {
    owners: BTreeMap<TaskId, CenterId>,
    pending: BTreeSet<TaskId>,
    pub(crate) deadline: Instant,
}

impl TaskSet {
    pub(crate) fn new(deadline: Instant) -> TaskSet {
        TaskSet {
            owners: BTreeMap::new(),
            pending: BTreeSet::new(),
            deadline,
        }
    }

    /// A pending task of `center`.
    pub(crate) fn add(&mut self, task: TaskId, center: CenterId) {
        self.owners.insert(task, center);
        self.pending.insert(task);
    }

    pub(crate) fn owner(&self, task: TaskId) -> Option<&CenterId> {
        self.owners.get(&task)
    }

    pub(crate) fn is_pending(&self, task: TaskId) -> bool {
        self.pending.contains(&task)
    }

    /// Ends `task` if it is `center`'s and still pending; says whether it was.
    pub(crate) fn settle(&mut self, task: TaskId, center: &CenterId) -> bool {
        self.owners.get(&task) == Some(center) && self.pending.remove(&task)
    }

    /// Ends every pending task of `center` (its connection is gone); returns them.
    pub(crate) fn drop_center(&mut self, center: &CenterId) -> Vec<TaskId> {
        let gone: Vec<TaskId> = self
            .pending
            .iter()
            .copied()
            .filter(|t| self.owners.get(t) == Some(center))
            .collect();
        for t in &gone {
            self.pending.remove(t);
        }
        gone
    }

    /// Ends every pending task (the deadline passed); returns them with their owners.
    pub(crate) fn expire(&mut self) -> Vec<(TaskId, CenterId)> {
        std::mem::take(&mut self.pending)
            .into_iter()
            .filter_map(|t| self.owners.get(&t).map(|c| (t, c.clone())))
            .collect()
    }

    pub(crate) fn is_done(&self) -> bool {
        self.pending.is_empty()
    }

    pub(crate) fn len(&self) -> usize {
        self.owners.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> CenterId {
        CenterId::new(s).unwrap()
    }

    #[test]
    fn a_task_settles_once_and_only_for_its_owner() {
        let now = Instant::now();
        let mut t = TaskSet::new(now);
        t.add(1, id("a"));
        t.add(2, id("b"));
        t.add(3, id("a"));
        assert!(!t.settle(1, &id("b")), "not b's task");
        assert!(t.settle(1, &id("a")));
        assert!(!t.settle(1, &id("a")), "settled already");
        assert_eq!(t.drop_center(&id("a")), vec![3]);
        assert!(!t.is_done());
        assert_eq!(t.expire(), vec![(2, id("b"))]);
        assert!(t.is_done());
        assert_eq!(t.owner(2), Some(&id("b")));
        assert_eq!(t.len(), 3);
    }
}
