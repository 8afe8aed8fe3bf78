//! Channel fan-out: one bus subscription per channel that has local subscribers, never one per
//! client. Each message is encoded once per mode into a complete WebSocket frame (the raw
//! payload, or the framed JSON wrapper) and the same bytes go to every subscriber.
//!
//! A channel's subscribers are spread over shards, one per core. The channel's pump task fans
//! out to shard 0 itself and hands each batch to one worker task per further shard, so a large
//! broadcast runs on every core while each subscriber still gets messages in order. A subscriber
//! gets all frames of a batch at once (one vectored write when its socket takes them).
//!
//! A fan-out walks a snapshot of its shard (an `Arc` slice, rebuilt only after the membership
//! changed), so it holds no lock while it writes and yields, and subscribing never waits for a
//! broadcast in progress. A session that joins during a fan-out gets the next message.
//!
//! Channels with history (`[[channel]]`): a session joins behind a [`Gate`] that holds the live
//! messages back while its history is read and sent; the gate then lets through only offsets
//! past what the read saw, so the seam between history and live has no gap and no duplicate.

use crate::frame;
use crate::session::{Session, Tally};
use bytes::Bytes;
use std::collections::HashMap;
use std::sync::{Arc, OnceLock};
use switchyard_bus::{Bus, BusError, Message as BusMessage, SubscribeOptions, Subscription};
use switchyard_protocol::envelope::header;
use switchyard_protocol::{framed, Naming};
use tokio::sync::{mpsc, Mutex};
use tokio::task::JoinHandle;

/// Live messages held back from one session while its history is sent, at most this many;
/// past it the session is taken off the channel and told (`recovery_overrun`).
pub const MAX_HELD: usize = 10_000;

/// Where a gated member is: holding live frames back, or letting through those after `floor`.
enum GateState {
    Holding(Vec<(u64, Bytes)>),
    Open {
        floor: u64,
    },
    /// More than [`MAX_HELD`] live messages came during the recovery.
    Overrun,
}

/// One session's seam between its channel history and the live messages.
pub struct Gate(parking_lot::Mutex<GateState>);

impl Gate {
    #[allow(clippy::new_without_default)]
    pub fn new() -> Self {
        Self(parking_lot::Mutex::new(GateState::Holding(Vec::new())))
    }

    /// A live message: held, delivered (past the floor), or dropped (at or below it: the
    /// history read already had it).
    fn pass(&self, sess: &Session, offset: Option<u64>, frame: &Bytes) {
        let mut g = self.0.lock();
        match &mut *g {
            GateState::Holding(held) => {
                if held.len() >= MAX_HELD {
                    *g = GateState::Overrun;
                } else {
                    held.push((offset.unwrap_or(0), frame.clone()));
                }
            }
            GateState::Open { floor } => {
                if offset.is_none_or(|o| o > *floor) {
                    sess.deliver(frame);
                }
            }
            GateState::Overrun => {}
        }
    }

    /// Sends `history` (frames oldest first), then the held live frames past `floor` (the
    /// newest offset the history read saw), and opens the gate. False when the session held
    /// back more than [`MAX_HELD`] messages meanwhile (nothing more is sent).
    pub fn open(&self, sess: &Session, history: &[Bytes], floor: u64) -> bool {
        let mut g = self.0.lock();
        let GateState::Holding(held) = std::mem::replace(&mut *g, GateState::Open { floor }) else {
            *g = GateState::Overrun;
            return false;
        };
        if !history.is_empty() {
            sess.deliver_all(history);
        }
        for (_, frame) in held.iter().filter(|(o, _)| *o > floor) {
            sess.deliver(frame);
        }
        true
    }
}

/// A subscriber: its session, and its gate on a channel with history.
#[derive(Clone)]
struct Member {
    sess: Arc<Session>,
    gate: Option<Arc<Gate>>,
}

/// A shard's subscribers, and the snapshot fan-outs walk (dropped on every change).
#[derive(Default)]
struct Members {
    map: HashMap<String, Member>,
    snapshot: Option<Arc<[Member]>>,
}

#[derive(Default)]
struct Shard(parking_lot::Mutex<Members>);

impl Shard {
    fn insert(&self, sess: &Arc<Session>, gate: Option<Arc<Gate>>) {
        let mut m = self.0.lock();
        m.map.insert(
            sess.id.clone(),
            Member {
                sess: sess.clone(),
                gate,
            },
        );
        m.snapshot = None;
    }

    fn remove(&self, id: &str) {
        let mut m = self.0.lock();
        if m.map.remove(id).is_some() {
            m.snapshot = None;
        }
    }

    fn len(&self) -> usize {
        self.0.lock().map.len()
    }

    /// The current members: one reference-count increment, unless the membership changed since
    /// the last call (then the slice is rebuilt once).
    fn snapshot(&self) -> Arc<[Member]> {
        let mut m = self.0.lock();
        if m.snapshot.is_none() {
            m.snapshot = Some(m.map.values().cloned().collect());
        }
        m.snapshot.clone().unwrap_or_default()
    }
}

struct Channel {
    shards: Arc<[Shard]>,
    pump: JoinHandle<()>,
    workers: Vec<JoinHandle<()>>,
}

impl Drop for Channel {
    fn drop(&mut self) {
        self.pump.abort();
        for w in &self.workers {
            w.abort();
        }
    }
}

impl Channel {
    fn shard(&self, session: &str) -> &Shard {
        shard_of(&self.shards, session)
    }
}

fn shard_of<'a>(shards: &'a [Shard], session: &str) -> &'a Shard {
    // ULIDs end in random characters: a cheap, stable spread.
    let h = session
        .bytes()
        .fold(0usize, |h, b| h.wrapping_mul(31).wrapping_add(b as usize));
    &shards[h % shards.len()]
}

/// Shards per channel: the cores this process may run on.
fn shard_count() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get()).clamp(1, 16)
}

/// The node's channels.
pub struct ChannelHub {
    bus: Arc<dyn Bus>,
    naming: Naming,
    channels: Mutex<HashMap<String, Channel>>,
}

impl ChannelHub {
    pub fn new(bus: Arc<dyn Bus>, naming: Naming) -> Self {
        Self {
            bus,
            naming,
            channels: Mutex::new(HashMap::new()),
        }
    }

    /// Adds `sess` to `channel`, subscribing on the bus first if it is the channel's first local
    /// subscriber. Returns once the bus subscription is live. With `gate`, live messages wait
    /// behind it until [`Gate::open`].
    pub async fn subscribe(&self, sess: &Arc<Session>, channel: &str, gate: Option<Arc<Gate>>) -> Result<(), BusError> {
        let mut chans = self.channels.lock().await;
        if let Some(c) = chans.get(channel) {
            c.shard(&sess.id).insert(sess, gate);
            return Ok(());
        }
        let sub = self
            .bus
            .subscribe(&self.naming.channel(channel), SubscribeOptions::default())
            .await?;
        let shards: Arc<[Shard]> = (0..shard_count()).map(|_| Shard::default()).collect();
        // The first subscriber is in before the pump can take a message.
        shard_of(&shards, &sess.id).insert(sess, gate);
        let name: Arc<str> = channel.into();
        let mut senders = Vec::new();
        let mut workers = Vec::new();
        for i in 1..shards.len() {
            let (tx, rx) = mpsc::channel(16);
            senders.push(tx);
            workers.push(tokio::spawn(worker(name.clone(), rx, shards.clone(), i)));
        }
        let pump = tokio::spawn(pump(name, sub, shards.clone(), senders));
        let c = Channel { shards, pump, workers };
        chans.insert(channel.to_owned(), c);
        metrics::gauge!(crate::metrics::CHANNELS_ACTIVE).set(chans.len() as f64);
        Ok(())
    }

    /// Removes `sess` from `channel`; the last one out drops the bus subscription.
    pub async fn unsubscribe(&self, sess: &Session, channel: &str) {
        let mut chans = self.channels.lock().await;
        let empty = match chans.get(channel) {
            Some(c) => {
                c.shard(&sess.id).remove(&sess.id);
                c.shards.iter().all(|s| s.len() == 0)
            }
            None => false,
        };
        if empty {
            chans.remove(channel);
            metrics::gauge!(crate::metrics::CHANNELS_ACTIVE).set(chans.len() as f64);
        }
    }

    /// Number of channels with a live bus subscription on this node.
    pub async fn active(&self) -> usize {
        self.channels.lock().await.len()
    }

    /// Local subscriber count of one channel.
    pub async fn subscribers(&self, channel: &str) -> usize {
        let chans = self.channels.lock().await;
        let Some(c) = chans.get(channel) else { return 0 };
        c.shards.iter().map(Shard::len).sum()
    }
}

/// One channel message, with its frames encoded on first use and then shared.
pub struct Item {
    offset: Option<u64>,
    payload: Bytes,
    /// The publisher marked it binary (`sy-opcode`).
    marked_binary: bool,
    raw: OnceLock<Bytes>,
    wrapped: OnceLock<Bytes>,
}

impl Item {
    pub fn new(m: &BusMessage) -> Self {
        Self {
            offset: m.offset,
            payload: m.record.payload.clone(),
            marked_binary: m.record.headers.get(header::OPCODE).is_some_and(|o| o == "binary"),
            raw: OnceLock::new(),
            wrapped: OnceLock::new(),
        }
    }

    /// Sent as a binary frame to raw subscribers (marked so, or not UTF-8).
    fn binary(&self) -> bool {
        self.marked_binary || std::str::from_utf8(&self.payload).is_err()
    }

    /// The frame for `sess`: the framed wrapper, or the payload as is.
    pub fn frame(&self, channel: &str, sess: &Session) -> &Bytes {
        if sess.route.is_framed() {
            self.wrapped
                .get_or_init(|| frame::text(framed::channel_message(channel, self.offset, &self.payload).as_bytes()))
        } else {
            self.raw.get_or_init(|| {
                // Only raw subscribers need the UTF-8 check: a text frame must be valid UTF-8.
                if self.marked_binary || std::str::from_utf8(&self.payload).is_err() {
                    frame::binary(&self.payload)
                } else {
                    frame::text(&self.payload)
                }
            })
        }
    }
}

/// Deliveries between two yields of a fan-out task, so a broadcast to many thousands of
/// sockets does not hold its worker thread (and the tasks queued behind it) for its whole run.
const YIELD_EVERY: usize = 256;

/// Sends a batch to every subscriber of one shard, all of the batch at once per subscriber.
/// `frames` is scratch space kept by the caller.
async fn fan_out(channel: &str, shard: &Shard, items: &[Item], frames: &mut Vec<Bytes>) {
    let subs = shard.snapshot();
    let mut tally = Tally::default();
    for (i, Member { sess: s, gate }) in subs.iter().enumerate() {
        if i % YIELD_EVERY == YIELD_EVERY - 1 {
            tally.flush();
            tokio::task::yield_now().await;
        }
        if let Some(gate) = gate {
            for item in items {
                gate.pass(s, item.offset, item.frame(channel, s));
            }
        } else if !s.route.is_framed() && s.cont.keeps() {
            // On a raw route every server frame is a delivery, kept for a resume.
            for item in items {
                // (None once handed over to another node: the session follows it there.)
                let _ = s.cont.deliver(&item.payload, item.binary(), None);
            }
        } else if let [one] = items {
            s.deliver_tallied(one.frame(channel, s), &mut tally);
        } else {
            frames.clear();
            frames.extend(items.iter().map(|i| i.frame(channel, s).clone()));
            s.deliver_all(frames);
        }
    }
    tally.flush();
    frames.clear();
}

async fn pump(channel: Arc<str>, mut sub: Subscription, shards: Arc<[Shard]>, workers: Vec<mpsc::Sender<Arc<[Item]>>>) {
    let received = metrics::counter!(crate::metrics::CHANNEL_MESSAGES);
    let mut batch = Vec::with_capacity(64);
    let mut frames = Vec::new();
    loop {
        batch.clear();
        if sub.recv_many(&mut batch, 64).await == 0 {
            tracing::warn!(%channel, "channel subscription closed by the bus");
            return;
        }
        received.increment(batch.len() as u64);
        let items: Arc<[Item]> = batch.iter().map(Item::new).collect();
        for (i, w) in workers.iter().enumerate() {
            // A shard's worker gets the batch only when the shard has subscribers.
            if shards[i + 1].len() > 0 && w.send(items.clone()).await.is_err() {
                return;
            }
        }
        fan_out(&channel, &shards[0], &items, &mut frames).await;
    }
}

async fn worker(channel: Arc<str>, mut rx: mpsc::Receiver<Arc<[Item]>>, shards: Arc<[Shard]>, index: usize) {
    let mut frames = Vec::new();
    while let Some(items) = rx.recv().await {
        fan_out(&channel, &shards[index], &items, &mut frames).await;
    }
}
