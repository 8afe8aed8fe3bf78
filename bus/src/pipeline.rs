//! Many publishes in flight, in order per key: [`Pipeline`].
//!
//! A consumer that forwards records one at a time (publish, await the broker's
//! acknowledgement, read the next) moves one record per round trip. A pipeline keeps up to
//! `max_in_flight` keys publishing at once, and queues a key's next record behind its
//! previous one, so each key (a session) keeps its order whatever the bus does with
//! concurrent publishes (the memory bus and NATS may reorder two publishes that wait for room
//! at the same time; Kafka's idempotent producer would not, but nothing here relies on it).

use crate::{Bus, BusError, Record};
use bytes::Bytes;
use futures::stream::{FuturesUnordered, StreamExt};
use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

type Publish<T> = Pin<Box<dyn Future<Output = (Bytes, T, Result<Option<u64>, BusError>)> + Send>>;

/// Publishes concurrently across keys, one at a time per key, with at most `max_in_flight`
/// publishes outstanding. `T` is the caller's tag for each record (what to count or commit
/// once it is done).
pub struct Pipeline<T> {
    bus: Arc<dyn Bus>,
    max_in_flight: usize,
    /// In a mutex only so that the pipeline is `Sync` (a publish future is not): it is never
    /// locked, every access goes through `get_mut`.
    in_flight: std::sync::Mutex<FuturesUnordered<Publish<T>>>,
    started: usize,
    /// Records waiting behind a publish of the same key, per key (present while the key has a
    /// publish in flight).
    waiting: HashMap<Bytes, VecDeque<(String, Record, T)>>,
    queued: usize,
}

impl<T: Send + 'static> Pipeline<T> {
    pub fn new(bus: Arc<dyn Bus>, max_in_flight: usize) -> Self {
        Self {
            bus,
            max_in_flight: max_in_flight.max(1),
            in_flight: std::sync::Mutex::new(FuturesUnordered::new()),
            started: 0,
            waiting: HashMap::new(),
            queued: 0,
        }
    }

    /// True when the caller should stop taking new records until [`Pipeline::next_done`]
    /// returns one (publishes in flight plus records queued behind them reach the bound).
    pub fn is_full(&self) -> bool {
        self.started + self.queued >= self.max_in_flight
    }

    /// Nothing in flight or queued.
    pub fn is_empty(&self) -> bool {
        self.started == 0
    }

    fn futures(&mut self) -> &mut FuturesUnordered<Publish<T>> {
        self.in_flight.get_mut().unwrap_or_else(|e| e.into_inner())
    }

    /// Publishes `record` to `topic` now, or after the records of its key already given.
    pub fn push(&mut self, topic: String, record: Record, tag: T) {
        let key = record.key.clone().unwrap_or_default();
        if let Some(q) = self.waiting.get_mut(&key) {
            q.push_back((topic, record, tag));
            self.queued += 1;
            return;
        }
        self.waiting.insert(key.clone(), VecDeque::new());
        self.start(key, topic, record, tag);
    }

    fn start(&mut self, key: Bytes, topic: String, record: Record, tag: T) {
        let bus = self.bus.clone();
        self.started += 1;
        self.futures().push(Box::pin(async move {
            let res = bus.publish(&topic, record).await;
            (key, tag, res)
        }));
    }

    /// The next finished publish, with its tag, in the order they finish (per key: in order).
    /// Starts that key's next record. Pending forever while nothing is in flight.
    pub async fn next_done(&mut self) -> (T, Result<Option<u64>, BusError>) {
        let Some((key, tag, res)) = self.futures().next().await else {
            return std::future::pending().await;
        };
        self.started -= 1;
        match self.waiting.get_mut(&key).and_then(VecDeque::pop_front) {
            Some((topic, record, next)) => {
                self.queued -= 1;
                self.start(key, topic, record, next);
            }
            None => {
                self.waiting.remove(&key);
            }
        }
        (tag, res)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{BusOptions, SubscribeOptions};

    fn rec(key: &str, n: u32) -> Record {
        Record {
            key: Some(Bytes::from(key.to_owned())),
            payload: Bytes::from(n.to_string()),
            ..Record::default()
        }
    }

    #[tokio::test]
    async fn keeps_order_per_key_and_bounds_what_is_in_flight() {
        let bus = crate::connect("memory://", &BusOptions::default()).await.unwrap();
        let mut sub = bus.subscribe("t.>", SubscribeOptions::default()).await.unwrap();
        let mut p: Pipeline<(String, u32)> = Pipeline::new(bus, 4);
        let mut done = Vec::new();
        for n in 0..50u32 {
            for k in ["a", "b", "c"] {
                while p.is_full() {
                    done.push(p.next_done().await);
                }
                p.push(format!("t.{k}"), rec(k, n), (k.to_owned(), n));
            }
        }
        while !p.is_empty() {
            done.push(p.next_done().await);
        }
        assert_eq!(done.len(), 150);
        assert!(done.iter().all(|(_, r)| r.is_ok()));
        // Per key, acknowledged and delivered in the order given.
        for k in ["a", "b", "c"] {
            let acked: Vec<u32> = done
                .iter()
                .filter(|((kk, _), _)| kk == k)
                .map(|((_, n), _)| *n)
                .collect();
            assert_eq!(acked, (0..50).collect::<Vec<_>>(), "acks of {k}");
        }
        let mut got: HashMap<String, Vec<u32>> = HashMap::new();
        for _ in 0..150 {
            let m = sub.recv().await.unwrap();
            let n = std::str::from_utf8(&m.record.payload).unwrap().parse().unwrap();
            got.entry(m.topic.to_string()).or_default().push(n);
        }
        for k in ["a", "b", "c"] {
            assert_eq!(
                got[&format!("t.{k}")],
                (0..50).collect::<Vec<_>>(),
                "delivered on t.{k}"
            );
        }
    }
}
