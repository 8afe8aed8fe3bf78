//! The session registry: session → node holding it, plus a bounded memory of recently closed
//! sessions so that late records are counted as `closed_session` rather than `unknown_session`.

use dashmap::DashMap;
use parking_lot::Mutex;
use std::collections::{HashSet, VecDeque};
use std::sync::Arc;

/// Where a session lives.
#[derive(Debug, Clone)]
pub struct Entry {
    pub node: Arc<str>,
    pub route: Arc<str>,
    /// The route's inbound topic (where a synthetic disconnect goes).
    pub inbound: Arc<str>,
}

/// Result of a lookup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    Open(Arc<str>),
    Closed,
    Unknown,
}

pub struct Registry {
    open: DashMap<String, Entry>,
    closed: Mutex<(VecDeque<String>, HashSet<String>)>,
    closed_cap: usize,
}

impl Registry {
    /// `closed_cap`: how many closed sessions to remember.
    pub fn new(closed_cap: usize) -> Self {
        Self {
            open: DashMap::new(),
            closed: Mutex::new((VecDeque::new(), HashSet::new())),
            closed_cap,
        }
    }

    /// Registers `session` on `node`; returns the node it was on before, if another.
    pub fn insert(&self, session: &str, node: &str, route: &str, inbound: &str) -> Option<Arc<str>> {
        self.open
            .insert(
                session.to_owned(),
                Entry {
                    node: node.into(),
                    route: route.into(),
                    inbound: inbound.into(),
                },
            )
            .map(|old| old.node)
            .filter(|old| &**old != node)
    }

    /// Sessions currently registered on `node`.
    pub fn sessions_on(&self, node: &str) -> Vec<(String, Entry)> {
        self.open
            .iter()
            .filter(|e| &*e.node == node)
            .map(|e| (e.key().clone(), e.value().clone()))
            .collect()
    }

    pub fn remove(&self, session: &str) {
        if self.open.remove(session).is_some() {
            let mut g = self.closed.lock();
            let (order, set) = &mut *g;
            if set.insert(session.to_owned()) {
                order.push_back(session.to_owned());
                if order.len() > self.closed_cap {
                    if let Some(old) = order.pop_front() {
                        set.remove(&old);
                    }
                }
            }
        }
    }

    pub fn lookup(&self, session: &str) -> Lookup {
        if let Some(e) = self.open.get(session) {
            return Lookup::Open(e.node.clone());
        }
        if self.closed.lock().1.contains(session) {
            Lookup::Closed
        } else {
            Lookup::Unknown
        }
    }

    pub fn get(&self, session: &str) -> Option<Entry> {
        self.open.get(session).map(|e| e.clone())
    }

    pub fn len(&self) -> usize {
        self.open.len()
    }

    pub fn is_empty(&self) -> bool {
        self.open.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_closed_unknown() {
        let r = Registry::new(2);
        r.insert("a", "n1", "/ws", "sy.in.app");
        assert_eq!(r.lookup("a"), Lookup::Open("n1".into()));
        r.remove("a");
        assert_eq!(r.lookup("a"), Lookup::Closed);
        assert_eq!(r.lookup("b"), Lookup::Unknown);
        for s in ["b", "c", "d"] {
            r.insert(s, "n", "/", "sy.in.x");
            r.remove(s);
        }
        assert_eq!(r.lookup("a"), Lookup::Unknown, "closed memory is bounded");
        assert_eq!(r.lookup("d"), Lookup::Closed);
    }
}
