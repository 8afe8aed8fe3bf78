//! Channel fan-out: one bus subscription per channel that has local subscribers, never one per
//! client. Each message is encoded once per mode (raw bytes, or the framed JSON wrapper) and the
//! same bytes are queued to every subscriber.

use crate::session::Session;
use parking_lot::RwLock;
use std::collections::HashMap;
use std::sync::Arc;
use switchyard_bus::{Bus, BusError, SubscribeOptions, Subscription};
use switchyard_protocol::envelope::header;
use switchyard_protocol::{framed, Naming};
use tokio::sync::Mutex;
use tokio::task::JoinHandle;
use tungstenite::{Message, Utf8Bytes};

type Subscribers = Arc<RwLock<HashMap<String, Arc<Session>>>>;

struct Channel {
    subscribers: Subscribers,
    pump: JoinHandle<()>,
}

impl Drop for Channel {
    fn drop(&mut self) {
        self.pump.abort();
    }
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
    /// subscriber. Returns once the bus subscription is live.
    pub async fn subscribe(&self, sess: &Arc<Session>, channel: &str) -> Result<(), BusError> {
        let mut chans = self.channels.lock().await;
        if let Some(c) = chans.get(channel) {
            c.subscribers.write().insert(sess.id.clone(), sess.clone());
            return Ok(());
        }
        let sub = self
            .bus
            .subscribe(&self.naming.channel(channel), SubscribeOptions::default())
            .await?;
        let subscribers: Subscribers = Arc::default();
        subscribers.write().insert(sess.id.clone(), sess.clone());
        let pump = tokio::spawn(pump(channel.to_owned(), sub, subscribers.clone()));
        chans.insert(channel.to_owned(), Channel { subscribers, pump });
        metrics::gauge!(crate::metrics::CHANNELS_ACTIVE).set(chans.len() as f64);
        Ok(())
    }

    /// Removes `sess` from `channel`; the last one out drops the bus subscription.
    pub async fn unsubscribe(&self, sess: &Session, channel: &str) {
        let mut chans = self.channels.lock().await;
        let empty = match chans.get(channel) {
            Some(c) => {
                let mut s = c.subscribers.write();
                s.remove(&sess.id);
                s.is_empty()
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
        self.channels
            .lock()
            .await
            .get(channel)
            .map_or(0, |c| c.subscribers.read().len())
    }
}

async fn pump(channel: String, mut sub: Subscription, subscribers: Subscribers) {
    let received = metrics::counter!(crate::metrics::CHANNEL_MESSAGES);
    let mut batch = Vec::with_capacity(64);
    loop {
        batch.clear();
        if sub.recv_many(&mut batch, 64).await == 0 {
            tracing::warn!(%channel, "channel subscription closed by the bus");
            return;
        }
        received.increment(batch.len() as u64);
        let subs = subscribers.read();
        for m in &batch {
            let payload = &m.record.payload;
            let mut raw: Option<Message> = None;
            let mut wrapped: Option<Message> = None;
            for s in subs.values() {
                let msg = if s.route.is_framed() {
                    wrapped
                        .get_or_insert_with(|| {
                            Message::Text(Utf8Bytes::from(framed::channel_message(&channel, m.offset, payload)))
                        })
                        .clone()
                } else {
                    raw.get_or_insert_with(|| {
                        let binary = match m.record.headers.get(header::OPCODE) {
                            Some(o) => o == "binary",
                            None => std::str::from_utf8(payload).is_err(),
                        };
                        match Utf8Bytes::try_from(payload.clone()) {
                            Ok(t) if !binary => Message::Text(t),
                            _ => Message::Binary(payload.clone()),
                        }
                    })
                    .clone()
                };
                s.deliver(msg);
            }
        }
    }
}
